"""Which transformers releases the kvmem integration supports, checked once at import.

Design note
-----------
The integration relies on transformers internals that change between minor releases: the layer
API of `cache_utils.Cache`, the attention and mask registries, and above all the continuous-
batching cache (`generation/continuous_batching/cache.py` and its `cache_allocators/` package),
whose sector/pool/allocator structure it re-hosts on kvmem blocks. The range below is the one
checked: those continuous-batching files are identical from 5.20.2 to 5.23.0 (apart from an import
moved between modules; 5.18.0's differ), and tests/test_integration_transformers.py passes on
5.20.2, 5.21.1, 5.22.2 and 5.23.0. The upper bound is the next minor release, not 6, because these
internals change between minor releases. A release outside the range fails loudly at import rather
than misbehaving later; widen it only after re-reading those files and running the tests against
the new release.
"""

from __future__ import annotations

from kvmem.integrations.releases import SupportedReleases

RELEASES = SupportedReleases("transformers", "transformers", minimum="5.20.2", maximum="5.24")
SUPPORTED = RELEASES.spec


class UnsupportedTransformersError(ImportError):
    """The installed transformers is missing or outside the supported range."""


def _installed() -> str:
    import transformers

    return transformers.__version__


def check_transformers_version(version: str | None = None) -> str:
    """Return the installed transformers version if it is supported.

    Args:
        version: A version string to check instead of the installed one (for tests).

    Raises:
        UnsupportedTransformersError: transformers is not installed, or its version is outside
            `SUPPORTED`; the message names the range and how to install it.
    """
    return RELEASES.check(
        _installed,
        UnsupportedTransformersError,
        relies_on="it relies on internals checked against that range",
        # Not kvmem's extra: kvmem is on no package index, so `pip install 'kvmem[transformers]'` fails.
        remedy=f"Install a supported release: pip install 'transformers{SUPPORTED}'",
        version=version,
        install_hint=f" (pip install 'transformers{SUPPORTED}')",
    )
