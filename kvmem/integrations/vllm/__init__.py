"""kvmem for vLLM: an elastic KV cache for a real vLLM engine, switched on by KVMEM=1.

    pip install . vllm==0.32.0      # kvmem from its clone; the plugin is registered through an entry point
    KVMEM=1 KVMEM_MODEL=llama-8b vllm serve ...                      # pages from kvmemd
    KVMEM=1 KVMEM_DEVICE=host KVMEM_BUDGET=8GiB vllm serve ...       # no daemon (CPU vLLM)

Design note
-----------
vLLM calls every `vllm.general_plugins` entry point in each of its processes (API server, engine
core, workers; `vllm/plugins/__init__.py` `load_general_plugins`, vllm 0.32). kvmem's entry point
is `register`. Without KVMEM=1 it does nothing, so installing kvmem beside vLLM changes nothing.
With KVMEM=1 it checks the vLLM version (`version.SUPPORTED`; outside it, `UnsupportedVllmError`
naming the range, never a silent run without kvmem) and replaces, in the modules that look
them up:

- the worker side (`allocation`, `budget`): `allocate_kv_cache` in `vllm.v1.worker.utils` and in
  every module that imports it by name (a `from ... import` binds its own name, so patching the
  defining module alone would not reach them), so vLLM's KV tensors lie on a kvmem reservation;
  the workers' `determine_available_memory`, so the KV cache's size is kvmem's budget; and
  `may_override_num_blocks`, so the block count is a whole number of page slots;
- the scheduler side (`pool`): the `BlockPool` the KV cache coordinator builds becomes
  `KvmemBlockPool`, whose blocks are backed by kvmem pages as they are used; the coordinator's
  `get_num_blocks_to_allocate` tells the pool what a request will take, and `Scheduler.schedule`
  holds the pool's lock for a step;
- where the workers are processes of their own (`ranked_cache`, `rank`): the workers get one
  method, `kvmem_rank`, through which the scheduler's pool maps and unmaps slots on every rank
  (vLLM's `collective_rpc`); `EngineCore._initialize_kv_caches` records the engine core whose
  executor reaches them, and `EngineCoreProc._handle_client_request` runs the pool's periodic
  `maintain` when a WAKEUP request carries `ranked_cache.TICK`.

`register` may run more than once per process; patching is idempotent.
"""

from __future__ import annotations

import importlib
import os

from kvmem.integrations.vllm.geometry import UnsupportedVllmConfigError
from kvmem.integrations.vllm.version import SUPPORTED, UnsupportedVllmError, check_vllm_version

# Modules holding a name `allocate_kv_cache` bound to vLLM's function (vllm 0.32.0 and 0.33.0): the definition
# in v1/worker/utils.py, and `from vllm.v1.worker.utils import allocate_kv_cache` in
# v1/worker/gpu_model_runner.py (GPUModelRunner, which the CPU model runner subclasses),
# v1/worker/gpu/attn_utils.py (the model-runner-v2 path) and v1/hisparse/binding.py.
PATCHED_MODULES = (
    "vllm.v1.worker.utils",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.attn_utils",
    "vllm.v1.hisparse.binding",
)
# Worker classes whose own `determine_available_memory` answers the KV cache's size (vllm 0.32.0, 0.33.0):
# the GPU worker, and the CPU worker, which overrides it.
WORKERS = (("vllm.v1.worker.gpu_worker", "Worker"), ("vllm.v1.worker.cpu_worker", "CPUWorker"))


def enabled() -> bool:
    """Whether KVMEM=1 asks for kvmem in this vLLM process."""
    return os.environ.get("KVMEM") == "1"


def _expect(module, name: str):
    if not hasattr(module, name):
        raise UnsupportedVllmError(f"kvmem's vLLM integration expects {module.__name__}.{name} (vllm {SUPPORTED})")
    return getattr(module, name)


def register() -> None:
    """The `vllm.general_plugins` entry point: with KVMEM=1, put vLLM's KV cache on kvmem.

    Raises:
        UnsupportedVllmError: KVMEM=1 and the installed vLLM is outside `SUPPORTED`, or a name the
            integration replaces is missing.
    """
    if not enabled():
        return
    check_vllm_version()
    from kvmem.integrations.vllm import allocation, budget, pool, rank, ranked_cache

    modules = [importlib.import_module(name) for name in PATCHED_MODULES]
    workers = []
    for module_name, class_name in WORKERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a build without this platform's worker (e.g. the CPU one on a GPU build)
            continue
        workers.append(_expect(module, class_name))
    engine_core = importlib.import_module("vllm.v1.engine.core")
    _expect(_expect(engine_core, "EngineCore"), "_initialize_kv_caches")
    _expect(_expect(engine_core, "EngineCoreProc"), "_handle_client_request")
    from kvmem.integrations.vllm.compat import ADAPTER  # the installed release's (`compat`)

    num_blocks_module = importlib.import_module(ADAPTER.num_blocks_module)
    coordinator = importlib.import_module("vllm.v1.core.kv_cache_coordinator")
    scheduler = importlib.import_module("vllm.v1.core.sched.scheduler")
    for module in modules:
        _expect(module, "allocate_kv_cache")
    _expect(num_blocks_module, "may_override_num_blocks")
    _expect(coordinator, "BlockPool")
    _expect(_expect(coordinator, "KVCacheCoordinator"), "get_num_blocks_to_allocate")
    _expect(_expect(scheduler, "Scheduler"), "schedule")
    if not workers:
        raise UnsupportedVllmError(f"kvmem's vLLM integration found none of the workers {WORKERS} (vllm {SUPPORTED})")

    # Checked everything first: nothing is patched unless everything can be.
    for module in modules:
        module.allocate_kv_cache = allocation.kvmem_allocate_kv_cache
    for worker in workers:
        stock = worker.__dict__.get("determine_available_memory")
        if stock is not None and not hasattr(stock, "__kvmem_stock__"):
            worker.determine_available_memory = budget.with_kvmem_budget(stock)
        worker.kvmem_rank = rank.kvmem_rank
    core, proc = engine_core.EngineCore, engine_core.EngineCoreProc
    if not hasattr(core._initialize_kv_caches, "__kvmem_stock__"):
        core._initialize_kv_caches = ranked_cache.binding_engine_core(core._initialize_kv_caches)
    if not hasattr(proc._handle_client_request, "__kvmem_stock__"):
        proc._handle_client_request = ranked_cache.handling_ticks(proc._handle_client_request)
    if not hasattr(num_blocks_module.may_override_num_blocks, "__kvmem_stock__"):
        num_blocks_module.may_override_num_blocks = budget.whole_slots(num_blocks_module.may_override_num_blocks)
    pool.set_backing(allocation.cache_for_pool)
    pool.install_scheduler_patches()


__all__ = [
    "PATCHED_MODULES",
    "SUPPORTED",
    "UnsupportedVllmConfigError",
    "UnsupportedVllmError",
    "check_vllm_version",
    "enabled",
    "register",
]
