# slab-deploy: `make demo` and `make test` set everything up from a fresh clone.
VENV    ?= .venv
PYTHON  ?= python3
# The CPU wheel of torch that these machines serve locally; override on other hosts,
# e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`.
TORCH   ?= torch==2.13.0
PY      := $(VENV)/bin/python
CLI     := $(VENV)/bin/slab-deploy
DEMO_MODEL ?= slab_deit_demo
DEMO_OUT   ?= demo-out
PYTEST_ARGS ?=

.PHONY: demo test test-zoo test-fast lint install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cpu,simplify,dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps 'nvidia-pytriton==0.7.0'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(CLI) models '*demo*'
	$(CLI) export --model $(DEMO_MODEL) --output $(DEMO_OUT)/$(DEMO_MODEL)-fp32 --force
	$(CLI) export --model $(DEMO_MODEL) --precision fp16 --output $(DEMO_OUT)/$(DEMO_MODEL)-fp16 --force
	$(CLI) export --model $(DEMO_MODEL) --precision int8 --output $(DEMO_OUT)/$(DEMO_MODEL)-int8 --force
	$(CLI) check --model $(DEMO_MODEL) --artifacts $(DEMO_OUT)/$(DEMO_MODEL)-fp32 --report $(DEMO_OUT)/check-fp32
	$(CLI) check --model $(DEMO_MODEL) --artifacts $(DEMO_OUT)/$(DEMO_MODEL)-fp16 --report $(DEMO_OUT)/check-fp16
	$(CLI) check --model $(DEMO_MODEL) --artifacts $(DEMO_OUT)/$(DEMO_MODEL)-int8 --report $(DEMO_OUT)/check-int8
	$(CLI) bench --device cpu --compare $(DEMO_MODEL) --profile ci-cpu --output $(DEMO_OUT)/bench
	@echo "artefacts in $(DEMO_OUT)/: $(DEMO_MODEL)-fp32/, -fp16/ and -int8/ (model.onnx, manifest.json),"
	@echo "  check-fp32/, check-fp16/ and check-int8/ (report.json, report.md, io.npz), bench/ (bench.json, .csv, .md)"

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
