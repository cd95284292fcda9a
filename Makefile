# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first and on its own (a bare `torch` requirement would pull the CUDA
# wheels on a CPU machine), then the package is built against it with --no-build-isolation.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnfx-installed

.PHONY: demo test test-gpu bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) -m attnfx.cli demo --backend inductor --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q tests

test-gpu: $(STAMP)   # on a CUDA machine: the compiled-Triton, bf16 and CUDA-op tests alone
	$(PY) -m pytest -q -m gpu tests

bench: $(STAMP)
	$(PY) bench/steering.py
	$(PY) bench/kernels.py
	$(PY) bench/relevance.py
	$(PY) bench/faithfulness.py

clean:
	rm -rf $(VENV) build src/*.egg-info demo-out .pytest_cache .hypothesis
