PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.cfg
	$(BIN)/python -m pip install -q -e '.[test,lint,mount]'
	@# the atheris runs of the fuzz harnesses need atheris (a prebuilt wheel): required in CI
	@# (UBDCOW_REQUIRE_UML=1); elsewhere they skip and the harness targets still run through hypothesis
	$(BIN)/python -m pip install -q atheris || { test "$$UBDCOW_REQUIRE_UML" != 1 && \
	  echo "atheris could not be installed: its runs will skip (the harness targets still run via hypothesis)"; }
	touch $@

# the demo needs only ubdcow and its runtime dependencies (not the test and lint extras, nor atheris)
$(VENV)/.runtime: $(BIN)/python pyproject.toml setup.cfg
	$(BIN)/python -m pip install -q -e .
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/ubdcow demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff format --check ubdcow
	$(BIN)/ruff check ubdcow
	$(BIN)/mypy ubdcow

bench: $(VENV)/.installed
	$(BIN)/python -m pytest benchmarks --benchmark-enable

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
