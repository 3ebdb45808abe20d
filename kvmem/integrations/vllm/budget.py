"""The size of vLLM's KV cache with kvmem: the daemon's budget, rounded to whole page slots.

Design note
-----------
vLLM sizes its KV cache once, at start: the engine core asks each worker how many bytes the KV
cache may take (`Worker.determine_available_memory`, `vllm/v1/worker/gpu_worker.py`; on CPU
`CPUWorker`, `vllm/v1/worker/cpu_worker.py`), turns bytes into blocks
(`get_kv_cache_config_from_groups`, through `may_override_num_blocks`, both in
`vllm/v1/core/kv_cache_utils.py` in 0.32 and `kv_cache_planning.py` in 0.33: `compat`) and
allocates them. Without kvmem that number is most of the device (`gpu_memory_utilization` after
a profile run) or `kv_cache_memory_bytes`, reserved for good.

With kvmem it is a *virtual* size: the worker answers the daemon's whole budget (or, without a
daemon, the local KVMEM_BUDGET) -- no model can ever hold more, and vLLM reserves nothing
physical at start (the lesson of kvcached's issue 448, where vLLM's start-up reservation defeated
the elastic cache). The answer goes through vLLM's own explicit-size path (the worker's
`kv_cache_memory_bytes` branch, which on a GPU still runs the profile pass that compiles the
model) so that the rest of vLLM's start-up is unchanged. A model's limit is enforced as it
changes, by the daemon and the block pool's count, not by resizing vLLM's pool.

The block count is then rounded down to a whole number of kvmem page slots (`may_override_num_blocks`,
also where vLLM applies `num_gpu_blocks_override`), so that each of vLLM's layer regions is a whole
number of slots (`kvmem.integrations.vllm.geometry`).

Which engines kvmem backs: TP of any size, PP=1, DP=1, with vLLM's in-process executor ('uni':
vLLM's default for one GPU, where the engine-core process runs the worker and the scheduler's pool
uses the worker's cache directly) or its multiprocess executor ('mp': every TP>1 engine, and the
CPU platform's default, where each rank's worker is a process and the pool drives the ranks'
caches through `kvmem.integrations.vllm.ranked_cache`). Other parallel configurations, other
executors (Ray, external launchers), and vLLM's own sleep mode (which moves the KV cache itself)
are refused with `UnsupportedVllmConfigError`.

With worker processes, vLLM sizes the cache in the engine core from the workers' answers, and
`may_override_num_blocks` runs there, not in the workers where the page slot's size in blocks is
known: the engine core asks the workers for it (`ranked_cache.worker_alignment`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from kvmem.integrations.vllm import allocation
from kvmem.integrations.vllm.geometry import UnsupportedVllmConfigError, blocks_per_slot
from kvmem.session import Session

logger = logging.getLogger(__name__)

_alignment = 1  # vLLM's block count is rounded down to a multiple of this (whole page slots)


def check_parallel_config(vllm_config: Any) -> None:
    """Refuse configurations kvmem cannot back (see the module docstring).

    Raises:
        UnsupportedVllmConfigError: Naming the setting and what kvmem supports.
    """
    parallel = vllm_config.parallel_config
    for name in ("pipeline_parallel_size", "data_parallel_size"):
        value = getattr(parallel, name, 1)
        if value != 1:
            raise UnsupportedVllmConfigError(
                f"kvmem backs vLLM engines with {name}=1; this one has {value}. Unset KVMEM to run it without kvmem"
            )
    backend = getattr(parallel, "distributed_executor_backend", None)
    if backend not in (None, "uni", "mp"):
        raise UnsupportedVllmConfigError(
            f"kvmem backs vLLM's in-process ('uni') and multiprocess ('mp') executors; this engine uses "
            f"{backend!r}. Use distributed_executor_backend='mp', or unset KVMEM to run it without kvmem"
        )
    if getattr(vllm_config.model_config, "enable_sleep_mode", False):
        raise UnsupportedVllmConfigError(
            "kvmem manages the KV cache's memory itself: use `kvctl sleep`/`kvctl wake` instead of vLLM's "
            "enable_sleep_mode"
        )


def alignment() -> int:
    """vLLM blocks per kvmem page slot, once this process's worker has computed it (else 1)."""
    return _alignment


def budget_bytes(s: Session) -> int:
    """The KV cache's virtual size: the daemon's budget, or a local session's budget."""
    return s.source.budget_pages * s.source.page_size


def slot_alignment(kv_cache_specs: dict[str, Any], page_size: int) -> int:
    """vLLM blocks per kvmem page slot for these layer specs (the least common multiple over specs)."""
    alignment = 1
    for spec in kv_cache_specs.values():
        step = spec.get_block_stride_alignment()
        stride = -(-spec.page_size_bytes // step) * step  # the padded page: vLLM's layer-outer block stride
        alignment = math.lcm(alignment, blocks_per_slot(stride, page_size))
    return alignment


def with_kvmem_budget(stock):
    """Wrap a worker's `determine_available_memory`: answer kvmem's virtual size (module docstring)."""

    def determine_available_memory(self) -> int:
        global _alignment
        check_parallel_config(self.vllm_config)
        s = allocation.session(self.device, self.vllm_config, rank=getattr(self, "local_rank", 0))
        size = budget_bytes(s)
        _alignment = slot_alignment(self.model_runner.get_kv_cache_spec(), s.source.page_size)
        cache_config = self.cache_config
        saved = cache_config.kv_cache_memory_bytes
        cache_config.kv_cache_memory_bytes = size  # vLLM's explicit-size path, with kvmem's size
        allocation.profiling = True
        try:
            available = stock(self)
        finally:
            allocation.profiling = False
            cache_config.kv_cache_memory_bytes = saved
        logger.info("kvmem: the KV cache may grow to %d bytes (kvmem's budget), mapped as it is used", available)
        return available

    determine_available_memory.__kvmem_stock__ = stock
    determine_available_memory.__doc__ = stock.__doc__
    return determine_available_memory


def whole_slots(stock):
    """Wrap `may_override_num_blocks` (its module: `compat`): round vLLM's block count down to whole slots."""

    def may_override_num_blocks(vllm_config, num_blocks: int) -> int:
        num_blocks = stock(vllm_config, num_blocks)
        align = _alignment
        if align <= 1:  # not a worker's process: the engine core of a multiprocess executor asks its workers
            from kvmem.integrations.vllm import ranked_cache

            align = ranked_cache.worker_alignment()
        if align <= 1 or not num_blocks % align:
            return num_blocks
        rounded = num_blocks // align * align
        if not rounded:
            raise UnsupportedVllmConfigError(
                f"kvmem: a KV cache of {num_blocks} blocks is less than one page slot of {align} blocks: raise "
                "the daemon's budget (or KVMEM_BUDGET)"
            )
        logger.info("kvmem: %d KV blocks rounded down to %d, a whole number of page slots", num_blocks, rounded)
        return rounded

    may_override_num_blocks.__kvmem_stock__ = stock
    may_override_num_blocks.__doc__ = stock.__doc__
    return may_override_num_blocks
