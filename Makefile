# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
# Both create .venv on first use; torch 2.13.0 comes from the machine's local file where present.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[diffusers,transformers,dev,ui]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/quantduo demo --out out/demo

test: install
	$(PY) -m pytest -q -x tests

.PHONY: install demo test
