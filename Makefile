# vaepipe: the two commands. Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
# TORCH=cpu installs torch and torchvision from PyTorch's CPU wheel index (a matching pair, no CUDA libraries) before
# the project, for machines without a GPU: `make demo TORCH=cpu`. The default takes both from the package index (the
# CUDA build, which runs on a CPU too). Either choice applies when .venv is created; `make clean-venv` starts over.
TORCH ?= default
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-cluster test-demo test-all ui venv clean clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
ifeq ($(TORCH),cpu)
	$(PY) -m pip install --quiet torch torchvision --index-url $(TORCH_CPU_INDEX)
else ifneq ($(TORCH),default)
	$(error TORCH=$(TORCH): use TORCH=cpu (PyTorch's CPU wheels) or leave it unset (the package index's build))
endif
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The whole pipeline on the embedded default: local Ray (127.0.0.1 only, Ray's token auth), sqlite MLflow store,
# offline data.
demo: $(VENV)/.installed
	RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/vaepipe demo $(CONFIG)

# tests/conftest.py settles Ray's settings for the test process (its local Ray listens on 127.0.0.1 only).
# `make test` runs every test but those of cluster infrastructure on loopback (marker `cluster`: three Ray nodes,
# elastic training, a `ray start` head, an S3 server; 9 minutes on 2 cores) and the whole demo (marker `demo`);
# `make test-cluster` and `make test-demo` run those, `make test-all` everything.
# TEST_WORKERS=2 runs two test files at a time (pytest-xdist): measured no faster on 2 cores (30 min against 32) and
# the multi-node cluster fixture timed out beside another Ray, so the default is one process.
TEST_WORKERS ?= 0
PYTEST := RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile
test: $(VENV)/.installed
	$(PYTEST) -m "not cluster and not demo" $(PYTEST_ARGS)

test-cluster: $(VENV)/.installed
	$(PYTEST) -m cluster $(PYTEST_ARGS)

# Whole-pipeline runs (marker `demo`): the demo as a newcomer runs it (tests/test_demo.py: its figures, its console's
# length, the README's snippets) and the pipeline over an HTTP tracking server with resume, promote, sample and
# evaluate (tests/pipelines/test_run.py).
test-demo: $(VENV)/.installed
	$(PYTEST) -m demo $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PYTEST) $(PYTEST_ARGS)

# The MLflow UI over the demo's store, on this machine only: open http://127.0.0.1:$(UI_PORT)
UI_PORT ?= 5000
ui: $(VENV)/.installed
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

clean:
	rm -rf runs .pytest_cache

clean-venv:
	rm -rf $(VENV)
