# The two commands of the README:
#   make demo   set up the environment and run the demo (fine-tune a shipped model with RGDM)
#   make test   set up the environment and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt -e ".[test,ray]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/rgdm demo

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest -q -n 2

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
