"""Sessions: how an engine gets elastic KV caches, from the daemon or on its own.

    session = kvmem.connect(model="llama-8b", gpu=0)      # pages from kvmemd
    session = kvmem.local(device="auto", budget="8GiB")   # pages made in this process
    cache = session.kv_cache(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128,
                             dtype="float16", max_tokens=1_000_000)

Closing a session closes its caches and returns every page; a process that exits without
closing gets its pages taken back by the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kvmem.cache import ElasticKVCache
from kvmem.client import DaemonClient
from kvmem.common.sizes import parse_size
from kvmem.device import open_device
from kvmem.page_source import LocalPageSource, PageSource


class Session:
    """A page source and the caches built on it. Made by `connect()` or `local()`."""

    def __init__(self, source: PageSource):
        self.source = source
        self.device = source.device
        self.caches: list[ElasticKVCache] = []
        self._sleep_hooks: list[Callable[[bool], None]] = []
        self._wake_hooks: list[Callable[[bool], None]] = []
        self._closed = False

    @property
    def status_segment(self) -> str | None:
        """The POSIX shared-memory name of the status segment where the daemon publishes this session's
        model (`kvmem.common.status.StatusReader` reads it); None for a local session (no daemon)."""
        return self.source.paths.shm_name if isinstance(self.source, DaemonClient) else None

    def on_sleep(self, hook: Callable[[bool], None]) -> Callable[[bool], None]:
        """Register `hook(offload)`, run when the operator puts this model to sleep (`kvctl sleep`).

        The hook is the engine's drain: it must stop admitting requests and finish or preempt the
        running ones before it returns. Without offload (`offload` False) it must also free every
        block, whose contents are discarded; with offload the blocks may stay allocated (the cache
        keeps their contents in the daemon's host tier). It runs on the cache's background thread.
        Usable as a decorator.
        """
        self._sleep_hooks.append(hook)
        for cache in self.caches:
            cache.add_sleep_hook(hook)
        return hook

    def on_wake(self, hook: Callable[[bool], None]) -> Callable[[bool], None]:
        """Register `hook(restored)`, run once the model is awake again and its cache usable.

        `restored` is False when an offloaded cache was lost: every block was freed and the engine
        must forget its block ids (and its prefix cache). Usable as a decorator.
        """
        self._wake_hooks.append(hook)
        for cache in self.caches:
            cache.wake_hooks.append(hook)
        return hook

    def kv_cache(
        self,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any = "float16",
        max_tokens: int | None = None,
        layout: str = "NHD",
        **options: Any,
    ) -> ElasticKVCache:
        """An elastic KV cache; see `ElasticKVCache` for `options` (watermarks, grow_wait, background).

        Raises:
            RuntimeError: The session already has a cache (one cache per model and session).
        """
        if self._closed:
            raise RuntimeError("the session is closed")
        if self.caches:
            raise RuntimeError("this session already has a KV cache: open one session per model")
        cache = ElasticKVCache(
            self.source,
            num_layers,
            block_size,
            num_kv_heads,
            head_dim,
            dtype,
            max_tokens,
            layout,
            sleep_hooks=self._sleep_hooks,
            wake_hooks=self._wake_hooks,
            **options,
        )
        self.caches.append(cache)
        return cache

    def close(self) -> None:
        """Close the caches (returning their pages), then the source. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for cache in self.caches:
            cache.close()
        self.source.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(model: str, gpu: int = 0, runtime_dir: str | os.PathLike | None = None, **client_options: Any) -> Session:
    """A session whose pages come from the kvmemd serving GPU `gpu`.

    Raises:
        kvmem.common.errors.DaemonUnavailableError: No daemon answers (start one with `kvmemd start`).
    """
    return Session(DaemonClient(model, gpu=gpu, runtime_dir=runtime_dir, **client_options))


def local(device: str = "auto", budget: int | str | None = None, gpu: int = 0) -> Session:
    """A session with no daemon: pages are made in this process, at most `budget` bytes of them.

    Args:
        device: ``"auto"``, ``"cuda"`` or ``"host"``.
        budget: Bytes (an int or a size such as ``"8GiB"`` or ``"50%"``); default: 90% of free memory.
    """
    dev = open_device(device, gpu)
    try:
        info = dev.memory_info()
        if budget is None:
            budget_bytes = int(info.free * 0.9)
        elif isinstance(budget, str):
            budget_bytes = parse_size(budget, total=info.total)
        else:
            budget_bytes = int(budget)
        return Session(LocalPageSource(dev, budget_bytes // dev.granularity))
    except BaseException:
        dev.close()
        raise


def from_environment(
    device: Any, model: Callable[[], str], holder: str, error: type[Exception], host_gpu: int = 0
) -> Session:
    """The session an engine integration opens for a KV cache on a torch device, from the environment.

    KVMEM_DEVICE=host: `local` host memory under KVMEM_BUDGET (no daemon; the cache must be on the
    CPU). Otherwise `connect` to the daemon of the cache's GPU (for a CPU cache, the host daemon
    serving as GPU `host_gpu`) in KVMEM_RUNTIME_DIR, as model `model()` (called only then).

    Args:
        device: The cache's torch device (its ``type`` and ``index``).
        model: The daemon model's name.
        holder: What the cache is, for the message ("vLLM's KV cache").
        error: The integration's exception for a host session asked for a GPU cache.
        host_gpu: Which host daemon a CPU cache uses (an engine's rank, where each rank has one).

    Raises:
        error: KVMEM_DEVICE=host for a cache that is not on the CPU.
        kvmem.common.errors.DaemonUnavailableError: No daemon answers.
    """
    if os.environ.get("KVMEM_DEVICE") == "host":
        if device.type != "cpu":
            raise error(f"kvmem: KVMEM_DEVICE=host gives CPU memory, but {holder} is on {device}")
        return local(device="host", budget=os.environ.get("KVMEM_BUDGET"))
    gpu = (device.index or 0) if device.type == "cuda" else host_gpu
    return connect(model(), gpu=gpu, runtime_dir=os.environ.get("KVMEM_RUNTIME_DIR"))
