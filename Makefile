# vaepipe: the two commands. Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: demo test venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The whole pipeline on the embedded default: local Ray, sqlite MLflow store, offline data.
demo: $(VENV)/.installed
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/vaepipe demo $(CONFIG)

test: $(VENV)/.installed
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
