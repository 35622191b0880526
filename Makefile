# Every target sets itself up: a missing .venv is created and the project installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Default torch for a fresh venv. 2.13.0 is a local CPU wheel on the CI machine and the
# regular PyPI build elsewhere; override e.g. `make test TORCH=torch` or install your own
# torch into .venv first (an installed torch is never replaced).
TORCH ?= torch==2.13.0
PRESET ?= default
STAMP := $(VENV)/.installed

.PHONY: test figures data bench anchors lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The layout is ruff's (`make format` applies it); the lint rules include docstrings on the
# public API of spectra and entropy_opt (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .

# One BLAS/OpenMP thread per process: the suite is many small products and several tests
# start subprocesses, where extra threads only oversubscribe the cores.
test: lint
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q

data: $(STAMP)
	$(BIN)/python -m figures.fetch_data --dest data

figures: $(STAMP) data
	$(BIN)/python -m figures all --preset $(PRESET)

# `make bench` runs every benchmark; the peer comparison uses .venv-anchors when it exists
# (`make anchors` creates it: PyHessian, hessian-eigenthings, curvlinops, with torch kept at
# $(TORCH); curvlinops/backpack go in without their torchvision dependency, which they do
# not need for Hessian products and which would pull in a multi-GB CUDA torch here).
bench: $(STAMP)
	$(BIN)/python -m benchmarks all

anchors: .venv-anchors/.installed
.venv-anchors/.installed: pyproject.toml
	test -x .venv-anchors/bin/python || $(PY) -m venv .venv-anchors
	.venv-anchors/bin/pip install -q "$(TORCH)" && echo "$(TORCH)" > .venv-anchors/pin.txt
	.venv-anchors/bin/pip install -q -c .venv-anchors/pin.txt -e . pyhessian hessian-eigenthings einops einconv linear_operator opt-einsum "transformers>=4.45"
	.venv-anchors/bin/pip install -q --no-deps curvlinops-for-pytorch backpack-for-pytorch
	touch $@

clean:
	rm -rf $(VENV) figures/out/cache
