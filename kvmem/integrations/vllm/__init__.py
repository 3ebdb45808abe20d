"""kvmem for vLLM: the worker's KV cache on a kvmem reservation, switched on by KVMEM=1.

    pip install kvmem vllm          # the plugin is registered through an entry point
    KVMEM=1 KVMEM_MODEL=llama-8b vllm serve ...                      # pages from kvmemd
    KVMEM=1 KVMEM_DEVICE=host KVMEM_BUDGET=8GiB vllm serve ...       # no daemon (CPU vLLM)

Design note
-----------
vLLM calls every `vllm.general_plugins` entry point in each of its processes (API server, engine
core, workers; `vllm/plugins/__init__.py` `load_general_plugins`, vllm 0.32). kvmem's entry point
is `register`. Without KVMEM=1 it does nothing, so installing kvmem beside vLLM changes nothing.
With KVMEM=1 it checks the vLLM version (`version.SUPPORTED`; outside it, `UnsupportedVllmError`
naming the range, never a silent run without kvmem) and replaces `allocate_kv_cache` with
`allocation.kvmem_allocate_kv_cache` in `vllm.v1.worker.utils` and in every module that imports it
by name (a `from ... import` binds its own name, so patching the defining module alone would not
reach them). `register` may run more than once per process; patching is idempotent.
"""

from __future__ import annotations

import importlib
import os

from kvmem.integrations.vllm.version import SUPPORTED, UnsupportedVllmError, check_vllm_version

# Modules holding a name `allocate_kv_cache` bound to vLLM's function (vllm 0.32.0): the definition
# in v1/worker/utils.py, and `from vllm.v1.worker.utils import allocate_kv_cache` in
# v1/worker/gpu_model_runner.py (GPUModelRunner, which the CPU model runner subclasses),
# v1/worker/gpu/attn_utils.py (the model-runner-v2 path) and v1/hisparse/binding.py.
PATCHED_MODULES = (
    "vllm.v1.worker.utils",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.attn_utils",
    "vllm.v1.hisparse.binding",
)


def enabled() -> bool:
    """Whether KVMEM=1 asks for kvmem in this vLLM process."""
    return os.environ.get("KVMEM") == "1"


def register() -> None:
    """The `vllm.general_plugins` entry point: with KVMEM=1, put vLLM's KV cache on kvmem.

    Raises:
        UnsupportedVllmError: KVMEM=1 and the installed vLLM is outside `SUPPORTED`, or a module
            expected to hold `allocate_kv_cache` does not.
    """
    if not enabled():
        return
    check_vllm_version()
    from kvmem.integrations.vllm.allocation import kvmem_allocate_kv_cache

    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "allocate_kv_cache"):
            raise UnsupportedVllmError(
                f"kvmem's vLLM integration expects {name}.allocate_kv_cache (vllm {SUPPORTED}); it is missing"
            )
        module.allocate_kv_cache = kvmem_allocate_kv_cache


__all__ = ["PATCHED_MODULES", "SUPPORTED", "UnsupportedVllmError", "check_vllm_version", "enabled", "register"]
