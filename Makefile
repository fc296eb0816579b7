PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.cfg
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	@# the fuzz harnesses need atheris (a prebuilt wheel); without it their test skips with a reason
	$(BIN)/python -m pip install -q atheris || echo "atheris could not be installed: the fuzz test will skip"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m ubdcow demo

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
