"""SGLang's MHA KV pool with its K/V buffers on a kvmem reservation: `KvmemMHATokenToKVPool`.

Design note
-----------
SGLang 0.5.23 `MHATokenToKVPool` (sglang/srt/mem_cache/memory_pool.py) keeps, per layer, a K and a
V buffer of ``size + page_size`` token rows: ``[rows, head_num, head_dim]`` (layout "nhd", the
default) or ``[rows // page_size, head_num, page_size, head_dim]`` ("hnd", SGLANG_USE_HND_KVCACHE).
Token slot ``t`` is row ``t``; SGLang page ``p`` is rows ``p * page_size`` to
``(p + 1) * page_size - 1``; page 0 is the padding page that dummy tokens write to and is never
allocated (`PagedTokenToKVPoolAllocator.clear` starts its free list at page 1). The in-tree
`_create_buffers_normal` makes them with `torch.zeros`, K and V of a layer as two halves of one
allocation so that V lies a whole number of pages after K. SGLang's platform hook
(`SRTPlatform.get_kv_pool_cls`, sglang/srt/platforms/interface.py) documents `_create_buffers` as
the override point for how the backing storage is carved; the rest of the pool (addressing,
`set_kv_buffer`, `get_key_buffer`, index translation) stays SGLang's.

`KvmemMHATokenToKVPool._create_buffers` carves the same buffers out of a kvmem `ElasticKVCache`
whose block is one SGLang page (``block_size = page_size``, ``num_kv_heads = head_num``): kvmem's
per-layer tensors ``[max_blocks, page_size, heads, dim]`` (kvmem "NHD") flattened to token rows are
SGLang's "nhd" buffers, and kvmem's "HND" tensors ``[max_blocks, heads, page_size, dim]`` are
SGLang's "hnd" buffers as they are. So SGLang page ``p`` is kvmem block ``p`` in every layer, and
kvmem's ranges (K0, V0, K1, V1, ...) keep V a whole number of pages after K, as in-tree. The pool's
``size`` is rounded up to kvmem's capacity (whole page slots), so every block id kvmem can hand out
is a row of the buffers; that costs only virtual addresses. The buffers' addresses never change
(pages are mapped into and out of the fixed reservation), so kernels and CUDA graphs captured over
them stay valid while memory comes and goes.

Nothing is mapped up front except the padding page (block 0, taken from kvmem for the pool's
lifetime, except while a discarding `kvctl sleep` has every page back: drain.py): memory is mapped
as `KvmemPagedTokenToKVPoolAllocator` (allocator.py) takes blocks for SGLang's requests and goes
back as they are freed. A pool used without that allocator would hand
SGLang unmapped rows, so `set_kv_buffer` refuses to run until the allocator has claimed the pool.

Not supported (refused with `UnsupportedSglangError` at construction): page size 1 (SGLang then
builds its non-paged `TokenToKVPoolAllocator`, which no platform hook replaces: kv_cache_configurator.py
`_build_token_to_kv_pool_allocator`), quantized KV methods (their buffers are made by the method),
``v_head_dim != head_dim``, the ROCm "vectorized_5d" layout, torch-memory-saver and custom memory
pools (other owners of the same memory), and dtypes kvmem does not hold.

The session comes from the caller (``session=``, for libraries and tests) or from the
environment (`open_session`): KVMEM_DEVICE=host with KVMEM_BUDGET for `kvmem.local`, else
`kvmem.connect` to the daemon of the pool's GPU in KVMEM_RUNTIME_DIR, as model KVMEM_MODEL (else
SGLang's served model name). A process with several pools (SWA's two, a draft model's) gives each
its own daemon model: the second is ``<model>-<allocation label or index>``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvmem.cache import ElasticKVCache
from kvmem.client import DaemonClient
from kvmem.common.layout import DTYPES
from kvmem.common.protocol import check_model_name, model_name_from
from kvmem.common.status import StatusError, StatusReader
from kvmem.integrations.sglang.version import UnsupportedSglangError
from kvmem.page_source import LocalPageSource, PageSource, Shortfall
from kvmem.session import Session, from_environment

logger = logging.getLogger(__name__)

# Pools alive in this process, closed at exit (the daemon would take the pages back anyway when the
# socket closes; closing first unmaps and returns them in order). Daemon model names in use here.
_live_pools: weakref.WeakSet[KvmemMHATokenToKVPool] = weakref.WeakSet()
_names_lock = threading.Lock()
_names_used: set[str] = set()

# How long a daemon headroom estimate is reused: SGLang's scheduler asks `available_size` several
# times per step, and the status segment changes on the daemon's own time scale.
_HEADROOM_TTL_S = 0.1


def model_name(label: str | None) -> str:
    """The daemon model name for a new pool in this process (see the module docstring).

    Raises:
        RuntimeError: Neither KVMEM_MODEL nor SGLang's served model name is known.
    """
    base = os.environ.get("KVMEM_MODEL")
    if base:
        try:
            check_model_name(base)
        except ValueError as exc:
            raise RuntimeError(f"kvmem: KVMEM_MODEL: {exc}") from None
    else:
        from sglang.srt.runtime_context import get_server_args

        server_args = get_server_args()
        base = getattr(server_args, "served_model_name", None) or getattr(server_args, "model_path", None)
        if not base:
            raise RuntimeError("kvmem: no model name for the daemon; set KVMEM_MODEL")
        base = model_name_from(base)  # SGLang falls back to the model's path, often long or not a name
    with _names_lock:
        name = base
        if name in _names_used:
            name = f"{base}-{label}" if label and f"{base}-{label}" not in _names_used else f"{base}-{len(_names_used)}"
        _names_used.add(name)
    return name


def open_session(device: torch.device, label: str | None) -> tuple[Session, str | None]:
    """A kvmem session for a pool on `device`, from the environment (see the module docstring),
    and the daemon model name it took (None for a local session); `release_name` gives it back."""
    taken: list[str] = []

    def take_name() -> str:
        taken.append(model_name(label))
        return taken[0]

    try:
        s = from_environment(device, take_name, "SGLang's KV pool", UnsupportedSglangError)
    except BaseException:
        if taken:
            release_name(taken[0])
        raise
    return s, (taken[0] if taken else None)


def release_name(name: str | None) -> None:
    """A daemon model name taken by `model_name` is free again (its session closed)."""
    with _names_lock:
        _names_used.discard(name)


class _Headroom:
    """How many more kvmem pages this cache could get now: an estimate, for `available_size`.

    Local source: its budget less what this cache holds (a local session serves one cache).
    Daemon: read from the status segment without a round trip: the budget not granted yet, plus
    the pages other models hold above both their live blocks and their minimum (the daemon asks
    those back before it denies), capped by this model's limit. Only `alloc` knows for sure.
    """

    def __init__(self, kv: ElasticKVCache, source: PageSource):
        self.kv = kv
        self.source = source
        self._reader: StatusReader | None = None
        self._value = 0
        self._at = -1.0

    def pages(self) -> int:
        if isinstance(self.source, LocalPageSource):
            return max(0, self.source.budget_pages - self.kv.stats().pages_held)
        if not isinstance(self.source, DaemonClient):
            return 0
        now = time.monotonic()
        if now - self._at > _HEADROOM_TTL_S:
            self._value = self._daemon_pages()
            self._at = now
        return self._value

    def _daemon_pages(self) -> int:
        client = self.source
        try:
            if self._reader is None:
                self._reader = StatusReader(client.paths.shm_name)
            snap = self._reader.snapshot()
        except StatusError:
            self.close()  # the daemon restarts or is gone: reopen next time
            return 0
        daemon = snap.daemon
        free = daemon.budget_pages - daemon.pages_granted - daemon.pages_quarantined
        me = None
        for model in snap.models:
            if model.client_id == client.client_id:
                me = model
            else:
                free += max(0, model.mapped_pages - max(model.used_pages, model.min_pages))
        if me is not None and me.limit_pages >= 0:
            free = min(free, me.limit_pages - me.mapped_pages)
        return max(0, free)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class KvmemMHATokenToKVPool(MHATokenToKVPool):
    """`MHATokenToKVPool` whose buffers are views of a kvmem `ElasticKVCache`; see the module docstring.

    Constructed by SGLang with exactly the in-tree keyword arguments (through the platform's
    `get_kv_pool_cls`), or directly with ``session=`` to use a session the caller owns (it is not
    closed with the pool) and ``cache_options=`` for `ElasticKVCache` (watermarks, grow_wait,
    background; grow_wait defaults to KVMEM_GROW_WAIT seconds, else 5).

    Attributes:
        kv: The kvmem cache under the buffers (kvmem block ``p`` = SGLang page ``p``).
        session: The kvmem session it came from.
    """

    def __init__(self, *args, session: Session | None = None, cache_options: dict | None = None, **kwargs):
        self.kv: ElasticKVCache | None = None
        self.session = session
        self._cache_options = {"grow_wait": float(os.environ.get("KVMEM_GROW_WAIT", "5")), **(cache_options or {})}
        self._owns_session = session is None
        self._model_name: str | None = None  # the daemon model name of a session this pool opened
        self._allocator = None
        self._headroom: _Headroom | None = None
        self.padding_held = False  # SGLang page 0 (kvmem block 0) is taken from kvmem
        self.drain = None  # the SchedulerDrain that sleeps and wakes this pool (drain.py), once attached
        super().__init__(*args, **kwargs)
        _live_pools.add(self)

    # ---- buffers ----

    def _refuse_unsupported(self) -> None:
        if self.page_size < 2:
            raise UnsupportedSglangError(
                "kvmem's SGLang pool needs --page-size 2 or more: with page size 1 SGLang builds its "
                "non-paged TokenToKVPoolAllocator, which no platform hook replaces (sglang 0.5.23)"
            )
        if self.is_quantized_kv_cache:
            raise UnsupportedSglangError(
                f"kvmem's SGLang pool does not hold quantized KV caches ({self.quant_method.name}); unset KVMEM"
            )
        if self.v_head_dim != self.head_dim:
            raise UnsupportedSglangError(
                f"kvmem's SGLang pool needs v_head_dim == head_dim (got {self.v_head_dim} and {self.head_dim})"
            )
        if not self.use_hnd and self.kv_cache_layout != "nhd":
            raise UnsupportedSglangError(
                f"kvmem's SGLang pool holds the 'nhd' and 'hnd' layouts, not {self.kv_cache_layout!r}"
            )
        if self.enable_custom_mem_pool or self.memory_saver_adapter.enabled:
            raise UnsupportedSglangError(
                "kvmem's SGLang pool owns the KV memory itself: turn off --enable-memory-saver and "
                "SGLANG_MOONCAKE_CUSTOM_MEM_POOL"
            )
        if str(self.dtype).removeprefix("torch.") not in DTYPES:
            raise UnsupportedSglangError(f"kvmem's SGLang pool holds {', '.join(DTYPES)} KV caches, not {self.dtype}")

    def _create_buffers(self) -> None:
        """The in-tree buffers' shapes, strides and dtype, over kvmem (the platform hook's override point)."""
        self._refuse_unsupported()
        device = torch.device(self.device)
        if self.session is None:
            self.session, self._model_name = open_session(device, self.allocation_label)
        try:
            kv = self.session.kv_cache(
                num_layers=self.layer_num,
                block_size=self.page_size,
                num_kv_heads=self.head_num,
                head_dim=self.head_dim,
                dtype=str(self.dtype).removeprefix("torch."),
                max_tokens=self.size + self.page_size,
                layout="HND" if self.use_hnd else "NHD",
                **self._cache_options,
            )
            self.kv = kv
            where = None if kv.k[0] is None else kv.k[0].device
            if where is None or where.type != device.type or device.index not in (None, where.index):
                raise UnsupportedSglangError(
                    f"kvmem's reservation is on {where or 'no torch device'}, but SGLang's KV pool is on {device}"
                )
            shortfall = self.take_padding_page()
            if shortfall is not None:
                raise UnsupportedSglangError(f"kvmem cannot map even SGLang's padding page: {shortfall}")
        except BaseException:
            self._close_kv()
            raise
        # Every block id kvmem can hand out is a row of the buffers (the tail is virtual addresses only).
        self.size = kv.max_blocks * self.page_size - self.page_size
        if self.use_hnd:
            self.num_pages = kv.max_blocks
            self.k_buffer = [t.view(self.store_dtype) for t in kv.k]
            self.v_buffer = [t.view(self.store_dtype) for t in kv.v]
        else:
            rows = (-1, self.head_num, self.head_dim)
            self.k_buffer = [t.view(self.store_dtype).view(rows) for t in kv.k]
            self.v_buffer = [t.view(self.store_dtype).view(rows) for t in kv.v]
        # As the in-tree _create_buffers does for unquantized caches:
        self.k_scale_buffer = self.v_scale_buffer = None
        self.native_k_scale_buffer = self.native_v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()
        self._headroom = _Headroom(kv, self.session.source)
        logger.info(
            "kvmem: SGLang KV pool of %d tokens (%d layers) on a kvmem reservation, %d-token pages",
            self.size,
            self.layer_num,
            self.page_size,
        )

    def finalize_backing(self, config) -> None:
        """SGLang's post-capture sizing (kv_pool_runtime.py `compute_post_capture_kv_resize`, CUDA only)
        calls this with the final token count, then the allocator's `resize(config)`. kvmem maps on
        demand, so there is nothing to back: the buffers keep the whole reservation (block ids
        anywhere in it stay rows) and the allocator's cap follows `config`."""
        return None

    @classmethod
    def open_pools(cls) -> list[KvmemMHATokenToKVPool]:
        """The kvmem pools of this process that are not closed."""
        return [pool for pool in _live_pools if pool.kv is not None]

    @property
    def allocator(self):
        """The `KvmemPagedTokenToKVPoolAllocator` that claimed the pool, or None."""
        return self._allocator

    # ---- the padding page (SGLang page 0) ----

    def take_padding_page(self) -> Shortfall | None:
        """Map kvmem's block 0 and hold it as SGLang's padding page; why not, if it cannot be had.

        Raises:
            ValueError: Block 0 is in use (only the pool may hold it).
        """
        shortfall = self.kv.map_slots([0])
        if shortfall is not None:
            return shortfall
        self.kv.take([0])
        self.padding_held = True
        return None

    def release_padding_page(self) -> None:
        """Give the padding page back to kvmem (a discarding sleep: nothing may run until it is
        taken again)."""
        self.kv.free([0])
        self.padding_held = False

    def forget_padding_page(self) -> None:
        """kvmem freed every block (an offloaded cache was lost): the padding page is not held."""
        self.padding_held = False

    # ---- the allocator's side ----

    def claim(self, allocator) -> None:
        """Called by `KvmemPagedTokenToKVPoolAllocator`: from now on it alone takes blocks from `kv`.

        Raises:
            RuntimeError: Another allocator has claimed the pool, or the pool is closed.
        """
        if self.kv is None:
            raise RuntimeError("the kvmem pool is closed")
        if self._allocator is not None and self._allocator is not allocator:
            raise RuntimeError("this kvmem pool already has an allocator; one allocator per pool")
        self._allocator = allocator

    def headroom_blocks(self) -> int:
        """Blocks kvmem could add by growing now (whole page slots): an estimate, see `_Headroom`."""
        if self._headroom is None:
            return 0
        return self._headroom.pages() // self.kv.pages_per_growth * self.kv.blocks_per_slot

    def set_kv_buffer(self, *args, **kwargs):
        if self._allocator is None:
            raise RuntimeError(
                "kvmem's SGLang pool is written before KvmemPagedTokenToKVPoolAllocator claimed it: another "
                "allocator hands out its pages, but kvmem maps memory only for the pages its own allocator "
                "takes (is the platform hook skipped? see kvmem.integrations.sglang)"
            )
        return super().set_kv_buffer(*args, **kwargs)

    # ---- lifecycle ----

    def _close_kv(self) -> None:
        if self.drain is not None:
            self.drain.abandon(self)  # before kv.close, which waits for a sleep hook to return
            self.drain = None
        if self._headroom is not None:
            self._headroom.close()
            self._headroom = None
        if self.kv is not None:
            self.kv.close()
            self.kv = None
        if self.session is not None and self._owns_session:
            self.session.close()
            self.session = None
            release_name(self._model_name)

    def close(self) -> None:
        """Drop the buffers, unmap everything and return every page (and the session, if the pool
        opened it). Idempotent. The buffers must not be used afterwards: their memory is unmapped."""
        self.k_buffer = self.v_buffer = None
        self._close_kv()


def close_all_pools() -> None:
    """Close every kvmem pool of this process (also run at exit)."""
    for pool in list(_live_pools):
        pool.close()


atexit.register(close_all_pools)
