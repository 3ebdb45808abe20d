"""kvmem for HuggingFace transformers: KV caches on kvmem blocks, paged attention, continuous batching.

    import kvmem
    from kvmem.integrations.transformers import KvmemCache, kvmem_continuous_batching

    session = kvmem.connect(model="llama-8b")                  # or kvmem.local(...)
    model.set_attn_implementation("kvmem_paged")              # optional: read blocks in place
    with KvmemCache(session, model.config) as cache:
        out = model.generate(input_ids, attention_mask=mask, cache=cache)  # past_key_values= before 5.24

    with kvmem_continuous_batching(model, session, max_tokens=65_536, block_size=16):
        results = model.generate_batch(prompts, continuous_batching_config=ContinuousBatchingConfig(page_size=16))

Design note
-----------
This module is the public entry point and nothing else: importing it checks the transformers
version (`version.SUPPORTED`; outside it the import fails with `UnsupportedTransformersError`
naming the range) and registers the "kvmem_paged" attention. The work lives in one module per job:
`cache` (the `Cache`), `attention` (the paged attention function), `batching` (kvmem
storage for `generate_batch`).
"""

from __future__ import annotations

from kvmem.integrations.transformers.version import (
    SUPPORTED,
    UnsupportedTransformersError,
    cache_argument,
    check_transformers_version,
)

# The keyword `generate` takes a cache by in the installed release ("cache" from 5.24), for code
# that runs on every supported release: model.generate(..., **{CACHE_ARGUMENT: cache}).
CACHE_ARGUMENT = cache_argument(check_transformers_version())

from kvmem.integrations.transformers import attention  # noqa: E402  (after the version check)
from kvmem.integrations.transformers.attention import kvmem_paged_attention  # noqa: E402
from kvmem.integrations.transformers.batching import KvmemPagedAttentionCache, kvmem_continuous_batching  # noqa: E402
from kvmem.integrations.transformers.cache import ATTENTION_NAME, KvmemCache, KvmemCacheFull, PagedKV  # noqa: E402

attention.register()

__all__ = [
    "ATTENTION_NAME",
    "CACHE_ARGUMENT",
    "SUPPORTED",
    "KvmemCache",
    "KvmemCacheFull",
    "KvmemPagedAttentionCache",
    "PagedKV",
    "UnsupportedTransformersError",
    "check_transformers_version",
    "kvmem_continuous_batching",
    "kvmem_paged_attention",
]
