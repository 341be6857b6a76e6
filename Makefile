# Every target bootstraps .venv itself; `make install` is idempotent (a stamp file
# records the pyproject.toml it installed, so a second run does nothing slow).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch must be installed first and pinned: a bare `torch` requirement pulls GB of CUDA.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= sbi,dask,physics,dev
PYTEST_ARGS ?=
# test files run in parallel worker processes (pytest-xdist), one file per worker at a
# time so that module fixtures are computed once; 2 workers suit CI's 2 cores.
# TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

.PHONY: install test test-slow test-gpu demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow and not gpu" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

# The accelerator tests (tests/test_gpu.py and the sbi backend's CUDA test): they skip
# where JAX (or torch) sees no GPU. Install with EXTRAS=sbi,dask,physics,dev,gpu.
test-gpu: install
	JAX_PLATFORMS=cuda,cpu $(PY) -m pytest -q -m "gpu" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/sbi-engine demo

bench: install
	$(PY) experiments/bench_simulate.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
