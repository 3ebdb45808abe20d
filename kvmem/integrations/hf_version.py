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

MIN_VERSION = "5.20.2"
MAX_VERSION = "5.24"  # exclusive
SUPPORTED = f">={MIN_VERSION},<{MAX_VERSION}"


class UnsupportedTransformersError(ImportError):
    """The installed transformers is missing or outside the supported range."""


def check_transformers_version(version: str | None = None) -> str:
    """Return the installed transformers version if it is supported.

    Args:
        version: A version string to check instead of the installed one (for tests).

    Raises:
        UnsupportedTransformersError: transformers is not installed, or its version is outside
            `SUPPORTED`; the message names the range and how to install it.
    """
    if version is None:
        try:
            import transformers
        except ImportError as exc:
            raise UnsupportedTransformersError(
                f"kvmem's transformers integration needs transformers {SUPPORTED}; it is not installed "
                "(pip install 'kvmem[transformers]')"
            ) from exc
        version = transformers.__version__
    from packaging.version import Version  # a dependency of transformers

    if not Version(MIN_VERSION) <= Version(version) < Version(MAX_VERSION):
        raise UnsupportedTransformersError(
            f"kvmem's transformers integration supports transformers {SUPPORTED} (it relies on internals "
            f"checked against that range); transformers {version} is installed. "
            "Install a supported release: pip install 'kvmem[transformers]'"
        )
    return version
