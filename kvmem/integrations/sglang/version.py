"""Which SGLang releases the kvmem integration supports, checked when it is switched on.

Design note
-----------
The integration subclasses SGLang internals that change from one 0.5.x release to the next:
`MHATokenToKVPool` (`sglang/srt/mem_cache/memory_pool.py`: the constructor's arguments, the
`_create_buffers` hook, the ``[size + page_size, head_num, head_dim]`` per-layer buffers),
`PagedTokenToKVPoolAllocator` (`sglang/srt/mem_cache/allocator/paged.py`: `free_pages`, the
`_release_page_ids` funnel every free goes through, `alloc`/`alloc_extend`/`alloc_decode`), and the
platform hooks `SRTPlatform.get_kv_pool_cls(kind=...)` / `get_paged_allocator_cls()`
(`sglang/srt/platforms/interface.py`) with platform discovery through the ``sglang.srt.platforms``
entry-point group (`sglang/srt/platforms/__init__.py` `_resolve_platform`). All of it was read in,
and tests/test_integration_sglang.py passes on, SGLang 0.5.23. Releases are weeks apart and each
reshapes these files, so the range is that release (and its post releases) only: widen it after
re-reading those files and running the tests against the new release. A release outside the range
fails loudly rather than running without kvmem.
"""

from __future__ import annotations

from kvmem.integrations.releases import SupportedReleases

RELEASES = SupportedReleases("SGLang", "sglang", minimum="0.5.23", maximum="0.5.24")
SUPPORTED = RELEASES.spec


class UnsupportedSglangError(RuntimeError):
    """KVMEM=1 is set but SGLang is missing, outside the supported range, or configured in a way kvmem cannot serve."""


def _installed() -> str:
    # From the distribution's metadata: importing sglang would load much of it.
    from importlib.metadata import version

    return version("sglang")


def check_sglang_version(version: str | None = None) -> str:
    """Return the installed SGLang version if it is supported.

    Args:
        version: A version string to check instead of the installed one (for tests).

    Raises:
        UnsupportedSglangError: SGLang is not installed, or its version is outside `SUPPORTED`;
            the message names the range.
    """
    return RELEASES.check(
        _installed,
        UnsupportedSglangError,
        relies_on="it subclasses KV pool and allocator internals checked against that range",
        remedy="Install a supported release (pip install sglang==0.5.23), or unset KVMEM to run SGLang without kvmem",
        version=version,
    )
