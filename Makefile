# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install the package; torch is pinned here (not in
# pyproject.toml) because an unpinned torch pulls a multi-GB CUDA build on
# machines where the CPU wheel lies on disk.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all venv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/n2v-chunked demo --out demo_output

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=25 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
