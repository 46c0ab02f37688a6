# tether: `make demo` runs the main job on the embedded defaults, `make test` runs the tests.
# Both create .venv and install on first use; re-running skips what is already done.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tether-installed

# A machine without an NVIDIA GPU gets the CPU build (here it lies on local disk; elsewhere add
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for a small download). With a GPU,
# pip resolves the CUDA build from the range in pyproject.toml. Override: make TORCH_SPEC=...
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)

.PHONY: demo test lint format bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/tether demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check platform tests benchmarks
	$(BIN)/ruff format --check platform tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format platform tests benchmarks
	$(BIN)/ruff check --fix platform tests benchmarks

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache .ruff_cache
