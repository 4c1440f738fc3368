# Two commands for a fresh machine (see README):
#   make demo   install into .venv and run the end-to-end demo on the embedded sample data
#   make test   install into .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU build of torch; a GPU user installs their CUDA build first (see README) and sets TORCH_SPEC= .
# TORCH_SPEC is repeated in every install below: a dependency wanting another torch (torchvision via
# dynamic-network-architectures -> timm) would otherwise replace the CPU build with a multi-GB CUDA one.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all lint install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/pip install --quiet -e . $(TORCH_SPEC)

install-test: $(BIN)/python
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/pip install --quiet -e ".[dev]" $(TORCH_SPEC)
	@# Ray for the `medseg batch --engine ray` cluster tests (they skip when it is missing)
	$(BIN)/pip install --quiet -e ".[ray]" $(TORCH_SPEC) || echo "ray not installable: the Ray cluster tests will skip" >&2
	@# ONNX + ONNX Runtime for `medseg export --format onnx` (tests/test_export.py skips without them)
	$(BIN)/pip install --quiet -e ".[onnx]" $(TORCH_SPEC) || echo "onnx/onnxruntime not installable: the export tests will skip" >&2

demo: install
	$(BIN)/medseg demo --out demo_output --overwrite

test: install-test
	$(BIN)/python -m pytest -q

test-all: install-test
	$(BIN)/python -m pytest -q --runslow

lint: install-test
	$(BIN)/ruff check medseg tests benchmarks
	$(BIN)/ruff format --check medseg tests benchmarks
	$(BIN)/mypy medseg

clean:
	rm -rf demo_output .pytest_cache .mypy_cache .ruff_cache
