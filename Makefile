# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first and on its own (a bare `torch` requirement would pull the CUDA
# wheels on a CPU machine), then the package is built against it with --no-build-isolation.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnfx-installed
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)
# check-cuda: the CUDA build's source list from setup.py, checked and its .cu files compiled with
# nvcc (never run): no GPU needed (tools/check_cuda_build.py says how).
NVCC ?= nvcc

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
	NVCC=$(NVCC) $(PY) tools/check_cuda_build.py

bench: $(STAMP)
	$(PY) bench/steering.py
	$(PY) bench/kernels.py
	$(PY) bench/relevance.py
	$(PY) bench/faithfulness.py
	$(PY) bench/ops_cpu.py
	$(PY) bench/compile_times.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/attnfx/*.so demo-out .pytest_cache .hypothesis
