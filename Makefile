# slab-deploy: `make demo` and `make test` set everything up from a fresh clone.
VENV    ?= .venv
PYTHON  ?= python3
# The CPU wheel of torch that these machines serve locally; override on other hosts,
# e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`.
TORCH   ?= torch==2.13.0
PY      := $(VENV)/bin/python
CLI     := $(VENV)/bin/slab-deploy
DEMO_MODEL ?= slab_deit_tiny
DEMO_OUT   ?= demo-out
PYTEST_ARGS ?=

.PHONY: demo test test-zoo test-fast lint install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cpu,simplify,dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(CLI) models 'slab_*'
	$(CLI) export --model $(DEMO_MODEL) --output $(DEMO_OUT)/$(DEMO_MODEL) --force
	$(CLI) check --model $(DEMO_MODEL) --artifacts $(DEMO_OUT)/$(DEMO_MODEL) --report $(DEMO_OUT)/$(DEMO_MODEL)/check
	$(CLI) bench --device cpu --compare $(DEMO_MODEL) --profile ci-cpu --output $(DEMO_OUT)/bench
	@echo "artefacts: $(DEMO_OUT)/$(DEMO_MODEL)/model.onnx, manifest.json, check/ and $(DEMO_OUT)/bench/"

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not zoo_large" $(PYTEST_ARGS)

test-zoo: $(VENV)/.installed
	$(PY) -m pytest -q -m zoo_large $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check slab_deploy tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
