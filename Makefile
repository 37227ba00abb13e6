# cdm: cascaded diffusion on diffusers. `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.cdm-installed

.PHONY: install test test-slow lint bench demo demo-train clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[demo,fid,test]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

lint: install
	$(BIN)/ruff check cdm pipelines tests benchmarks
	$(BIN)/ruff format --check cdm pipelines tests benchmarks

bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache runs samples
