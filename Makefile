# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first and on its own (a bare `torch` requirement would pull the CUDA
# wheels on a CPU machine), then the package is built against it with --no-build-isolation.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnfx-installed
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)
# check-cuda: compile (never run) every csrc/*.cu, with torch's nvcc flags; no GPU needed. C++20 as
# torch 2.13 builds extensions (its headers use C++20 bit-field initialisers: C++17 compiles our
# sources too, with 33 warnings from torch's own headers).
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE: torch's CPU wheels ship c10/cuda's headers but not the
# generated c10/cuda/impl/cuda_cmake_macros.h, which only sets a Windows export macro.
NVCC ?= nvcc
NVCC_ARCH ?= -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
NVCC_FLAGS := -std=c++20 -O3 -Xcompiler -fPIC -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D__CUDA_NO_HALF_OPERATORS__ \
	-D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
	--expt-relaxed-constexpr $(NVCC_ARCH)

.PHONY: demo test test-gpu bench install clean check-cuda support-table

install: $(STAMP)

# csrc/ sources too: a change there rebuilds attnfx._C before `make test` runs.
$(STAMP): pyproject.toml setup.py $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) -m attnfx.cli demo --backend inductor --out demo-out

# Two workers of one thread each (the CI machine's two cores), a test file per worker so a file's
# compiled models are shared by its tests; the slowest tests and the total time are printed.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

test-gpu: $(STAMP)   # on a CUDA machine: the compiled-Triton, bf16 and CUDA-op tests alone
	$(PY) -m pytest -q -m gpu tests

support-table: $(STAMP)   # README's per-family table, rendered from tests/zoo.py
	$(PY) tests/support_table.py --write

check-cuda: $(STAMP)
	@tmp=$$(mktemp -d) && includes=$$($(PY) -c "from torch.utils.cpp_extension import include_paths; \
	  print(' '.join('-I' + p for p in include_paths()))") && \
	for f in csrc/*.cu; do \
	  echo "nvcc -c $$f"; \
	  $(NVCC) -c $(NVCC_FLAGS) $$includes -o $$tmp/$$(basename $$f .cu).o $$f || { rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp

bench: $(STAMP)
	$(PY) bench/steering.py
	$(PY) bench/kernels.py
	$(PY) bench/relevance.py
	$(PY) bench/faithfulness.py
	$(PY) bench/ops_cpu.py
	$(PY) bench/compile_times.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/attnfx/*.so demo-out .pytest_cache .hypothesis
