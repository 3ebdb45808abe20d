"""kvmem: elastic, shared KV-cache memory for LLM engines.

The device layer (`kvmem.device`) gives virtual reservations and physical pages on a GPU (CUDA
VMM) or in host RAM; the daemon `kvmemd` owns a GPU's pages and lends them to engine processes;
`kvctl` drives it. Engines use `connect()` (pages from the daemon) or `local()` (no daemon) and
build an elastic KV cache with `Session.kv_cache`. What the daemon, engines and kvctl share (wire
protocol, status layout, KV layout descriptor, runtime paths, sizes, errors) is `kvmem.common`.

Importing `kvmem` loads nothing: the names below are imported on first use, so the daemon, which
imports `kvmem.common` and `kvmem.device`, never loads the engine side (the cache, torch, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "ElasticKVCache": "kvmem.cache",
    "KVCacheFull": "kvmem.cache",
    "Session": "kvmem.session",
    "connect": "kvmem.session",
    "local": "kvmem.session",
}

if TYPE_CHECKING:
    from kvmem.cache import ElasticKVCache, KVCacheFull
    from kvmem.session import Session, connect, local

__all__ = ["ElasticKVCache", "KVCacheFull", "Session", "__version__", "connect", "local"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmem' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
