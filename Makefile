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

.PHONY: test figures data bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

data: $(STAMP)
	$(BIN)/python -m figures.fetch_data --dest data

figures: $(STAMP) data
	$(BIN)/python -m figures all --preset $(PRESET)

bench: $(STAMP)
	$(BIN)/python -m benchmarks all

clean:
	rm -rf $(VENV) figures/out/cache
