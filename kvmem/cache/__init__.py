"""The elastic KV cache and its parts (see `kvmem.cache.kv_cache` for the design note)."""

from kvmem.cache.kv_cache import ElasticKVCache, KVCacheFull, KVCacheStats

__all__ = ["ElasticKVCache", "KVCacheFull", "KVCacheStats"]
