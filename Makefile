# safeshift — the two commands of the quick start, plus lint and benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench bench-quick examples clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)  ## set up and run the embedded demo
	$(VENV)/bin/safeshift demo

test: $(STAMP) lint  ## set up, lint, type-check and run every test
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

bench: $(STAMP)  ## every benchmark at full size
	$(VENV)/bin/safeshift bench assign
	$(VENV)/bin/safeshift bench decisions
	$(VENV)/bin/safeshift bench gateway

bench-quick: $(STAMP)
	$(VENV)/bin/safeshift bench assign --quick
	$(VENV)/bin/safeshift bench decisions --quick
	$(VENV)/bin/safeshift bench gateway --quick

examples: $(STAMP)  ## re-train the example models shipped in examples/
	$(PY) -m safeshift.demo --write-examples examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
