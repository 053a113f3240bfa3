# `make run`, `make test` and `make reliability` each build the environment on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
# torch goes in first, pinned: an unpinned torch (or a package asking for a newer one)
# would pull a multi-GB CUDA build. Override for a GPU machine: make TORCH=torch==2.13.0
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.swarm-installed
PYTEST_ARGS ?=

.PHONY: run test reliability bench loader-bench bench-text install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-pin.txt -e '.[test]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/swarm lifecycle

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The reliability and security suite (kills, storage faults, corruption, bad input, security;
# then the issues' long acceptance runs in tests/acceptance, e.g. the text lifecycle in < 5 min;
# about 15 min on 2 cores). RELIABILITY.md is rewritten from the results it measures, pass or fail.
RELIABILITY_RESULTS ?= build/reliability/results.json

reliability: $(STAMP)
	rm -f $(RELIABILITY_RESULTS)
	SWARM_RELIABILITY_RESULTS=$(RELIABILITY_RESULTS) $(BIN)/python -m pytest -q -m reliability tests/reliability $(PYTEST_ARGS); \
	status=$$?; \
	$(BIN)/python -m tests.reliability.report $(RELIABILITY_RESULTS) RELIABILITY.md || status=1; \
	$(BIN)/python -m pytest -q -s -m acceptance tests/acceptance $(PYTEST_ARGS) || status=1; \
	exit $$status

# The peer of the staging benchmark, without its dependencies (see the `bench` extra).
MDS    ?= mosaicml-streaming==0.13.0
BENCH_ARGS ?=

bench: $(STAMP)
	$(BIN)/python -m pip install -q -c $(VENV)/torch-pin.txt -e '.[bench]'
	$(BIN)/python -m pip install -q -c $(VENV)/torch-pin.txt --no-deps "$(MDS)"
	$(BIN)/python benchmarks/stage_bench.py $(BENCH_ARGS)

# benchmarks/loader_bench.py with its peers (MosaicML Streaming, Ray Data) in a venv of its own:
# torch pinned first, the peers constrained to it, so neither replaces it (checked after).
BENCH_VENV ?= .venv-bench
RAY        ?= ray[data]==2.60.0
BENCH_STAMP := $(BENCH_VENV)/.loader-bench-installed

$(BENCH_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(BENCH_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(BENCH_VENV)/torch-pin.txt
	$(BENCH_VENV)/bin/python -c "import torch; print(torch.__version__)" > $(BENCH_VENV)/torch-build.txt
	$(BENCH_VENV)/bin/python -m pip install -q -c $(BENCH_VENV)/torch-pin.txt -e '.[test,bench]'
	$(BENCH_VENV)/bin/python -m pip install -q -c $(BENCH_VENV)/torch-pin.txt --no-deps "$(MDS)"
	$(BENCH_VENV)/bin/python -m pip install -q -c $(BENCH_VENV)/torch-pin.txt "$(RAY)"
	$(BENCH_VENV)/bin/python -c "import torch, ray; built = open('$(BENCH_VENV)/torch-build.txt').read().strip(); \
		assert torch.__version__ == built, f'torch {torch.__version__} replaced {built}'"
	touch $@

loader-bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/loader_bench.py $(BENCH_ARGS)

# Text staging with tokenization vs encode_batch and Hugging Face `datasets` (benchmarks/text_bench.py);
# `datasets` is the benchmark's peer only, installed without replacing torch.
DATASETS ?= datasets==5.2.0
TEXT_BENCH_ARGS ?=

bench-text: $(STAMP)
	$(BIN)/python -m pip install -q -c $(VENV)/torch-pin.txt "$(DATASETS)"
	$(BIN)/python benchmarks/text_bench.py $(TEXT_BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .swarm swarm-data
