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

# test-min: the oldest supported stack, the GPU machine's (torch 2.11 — the registry's wheel is the
# CUDA build, ~5 GB with its nvidia packages, and runs on the CPU —, triton 3.6, transformers 5.17;
# numpy < 2.4, which triton 3.6's interpreter needs), in a second virtualenv, on the tests that
# touch dynamo, lowering, the ops and the kernels (in the interpreter). attnfx is built there from a
# copy of the sources (the editable .venv builds _C in place), and with torch's CUDA build that is
# the real CUDA build of attnfx._C, as setup.py lists it, for sm_80 and sm_90.
MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.attnfx-installed
# torch guesses the toolkit from `which nvcc` (here a wrapper in /usr/local/bin, so /usr/local, without
# the libraries); the toolkit's own folder, where there is one.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
MIN_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"
MIN_TESTS := tests/test_lower.py tests/test_compile.py tests/test_passes.py tests/test_ops.py tests/test_kernels.py \
	tests/test_lrp_rules.py tests/test_attention_stats.py tests/test_attention_argmax.py tests/test_readout.py tests/test_backends.py \
	tests/test_errors.py tests/test_generation.py tests/test_hf_parity.py tests/test_graph_breaks.py tests/test_cuda_build.py \
	tests/test_device_map.py

.PHONY: demo test test-min test-gpu gpu-check bench install clean check-cuda support-table browser docs

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

$(MIN_STAMP): pyproject.toml setup.py $(CSRC) $(wildcard src/attnfx/*.py src/attnfx/*/*.py)
	test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(MIN_PY) -m pip install -q $(MIN_PINS)
	rm -rf $(MIN_VENV)/src && mkdir -p $(MIN_VENV)/src
	tar --exclude='*.so' --exclude=__pycache__ -cf - pyproject.toml setup.py README.md src csrc \
	  | tar -xf - -C $(MIN_VENV)/src
	cd $(MIN_VENV)/src && $(if $(CUDA_HOME),CUDA_HOME=$(CUDA_HOME)) TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=2 ../bin/python -m pip install -q \
	  --no-build-isolation ".[test]" $(MIN_PINS)
	touch $@

test-min: $(MIN_STAMP)
	$(MIN_PY) -c "import torch, triton, transformers; from attnfx.ops import _cpp; \
	  print('oldest stack: torch', torch.__version__, 'triton', triton.__version__, 'transformers', \
	  transformers.__version__, '| attnfx._C CUDA kernels:', _cpp.has_kernels(['attention_stats', 'head_readout', \
	  'lrp_act'], 'cuda'))"
	OMP_NUM_THREADS=1 $(MIN_PY) -m pytest -q -n 2 --dist loadfile --durations=10 $(MIN_TESTS)

# gpu-check: the prepared run for a lent GPU machine (≤ 9 min, no network, nothing installed there:
# so no $(STAMP)); on a CPU it is a dry run whose GPU stages skip. PY=python3 on the GPU machine.
gpu-check:
	PY=$(if $(wildcard $(PY)),$(PY),python3) bash tools/gpu_check.sh

test-gpu: $(STAMP)   # on a CUDA machine: the compiled-Triton, bf16 and CUDA-op tests alone
	$(PY) -m pytest -q -m gpu tests

# browser: Debian's chromium, which tests/test_views.py renders the HTML views in (those tests skip
# without it, unless ATTNFX_REQUIRE_BROWSER=1, as CI sets); sudo only where we are not root.
browser:
	@test -x /usr/bin/chromium || { SUDO=; if [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }
	/usr/bin/chromium --version

# docs: the site (docs/ + the API reference from the docstrings) into site/, offline; --strict turns
# every warning (a broken link, a page outside the nav, an unreadable docstring) into a failure.
docs: $(STAMP)
	$(PY) -c "import mkdocstrings_handlers.python" 2>/dev/null || $(PY) -c "import tomllib; \
	  print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))" \
	  | xargs -d '\n' $(PY) -m pip install -q
	$(PY) -m mkdocs build --strict

support-table: $(STAMP)   # the per-family table of README and docs/guides/models.md, from tests/zoo.py
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
	$(PY) bench/records.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/attnfx/*.so demo-out site .pytest_cache .hypothesis
