"""kvmem: elastic, shared KV-cache memory for LLM engines.

The device layer (`kvmem.device`) gives virtual reservations and physical pages on a GPU (CUDA
VMM) or in host RAM; the daemon `kvmemd` owns a GPU's pages and lends them to engine processes;
`kvctl` drives it. Engines use `connect()` (pages from the daemon) or `local()` (no daemon) and
build an elastic KV cache with `Session.kv_cache`.
"""

__version__ = "0.1.0"

from kvmem.kv_cache import ElasticKVCache, KVCacheFull
from kvmem.session import Session, connect, local

__all__ = ["ElasticKVCache", "KVCacheFull", "Session", "__version__", "connect", "local"]
