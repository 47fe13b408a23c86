# Every install step lives here: a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint fmt typecheck bench conformance samples smoke check clean

help:
	@echo "make demo     install, then run modelshrink on a bundled sample model"
	@echo "make test     install, then run the whole test suite"
	@echo "make lint     ruff (format + lint) and mypy"
	@echo "make bench    benchmarks: figures and ratios measured in one run"
	@echo "make conformance  every command over onnx's shipped models: a table of outcomes"
	@echo "make samples  regenerate sample_models/ and check they are byte-identical"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The main job on a bundled sample: quantize with a gate (full report), then the whole story:
# remove a quarter of the channels, win the accuracy back by distilling from the original,
# quantize, and compare the result with the original. (The sample data has 360 rows; distill
# trains on 80 % of them, so the final agreement is not a held-out figure: bench/ has those.)
demo: install
	@mkdir -p build/demo
	$(BIN)/modelshrink inspect sample_models/digits_cnn.onnx
	$(BIN)/modelshrink quantize sample_models/digits_cnn.onnx -o build/demo/digits_cnn.int8.onnx --force \
		--data sample_models/digits_cnn.npz --min-agreement 0.99
	$(BIN)/modelshrink prune sample_models/digits_cnn.onnx -o build/demo/pruned.onnx --force -q \
		--structured --sparsity 0.25
	$(BIN)/modelshrink distill build/demo/pruned.onnx -o build/demo/recovered.onnx --force -q \
		--teacher sample_models/digits_cnn.onnx --data sample_models/digits_cnn.npz --epochs 30
	$(BIN)/modelshrink quantize build/demo/recovered.onnx -o - --format cast -q \
		| $(BIN)/modelshrink compare sample_models/digits_cnn.onnx - \
		--data sample_models/digits_cnn.npz --samples 360

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

fmt: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy modelshrink

typecheck: install
	$(BIN)/mypy modelshrink

smoke: install
	$(BIN)/modelshrink --help > /dev/null

bench: install
	$(BIN)/python bench/run.py

conformance: install
	$(BIN)/python bench/run.py conformance

samples: install
	$(BIN)/python sample_models/make_samples.py
	git diff --exit-code -- sample_models

check: lint test smoke

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
