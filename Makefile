# kvmem: set-up and the main commands. Each target creates .venv and installs what it needs.
#   make demo   the main job on this machine's default device (GPU if there is one, else host RAM)
#   make test   the whole test suite (lint included); .ci/run calls exactly this
#   make bench  the benchmarks, writing JSON under benchmarks/results/ (bench_kernels.py only with a GPU)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvmem-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch goes in first: with a GPU the default (CUDA) build; without one the pinned CPU build,
# so that the torch extra never pulls a multi-GB CUDA wheel onto a CPU machine.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	if nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[torch,test,transformers,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/colocation.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_device.py --update-readme
	$(BIN)/python benchmarks/bench_daemon.py --update-readme
	$(BIN)/python benchmarks/bench_kv_cache.py --update-readme
	$(BIN)/python benchmarks/bench_allocator.py --update-readme
	$(BIN)/python benchmarks/bench_sleep.py --update-readme
	$(BIN)/python benchmarks/bench_colocation.py --update-readme
	$(BIN)/python benchmarks/bench_kernels.py --update-readme  # needs a GPU; says so and exits 0 without one

clean:
	rm -rf $(VENV) tests/fakecuda/build .pytest_cache .ruff_cache
