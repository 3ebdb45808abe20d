"""Which transformers releases the kvmem integration supports, checked once at import.

Design note
-----------
The integration relies on transformers internals that change between minor releases: the layer
API of `cache_utils.Cache`, the attention and mask registries, and above all the continuous-
batching cache (`generation/continuous_batching/cache.py` and its `cache_allocators/` package),
whose sector/pool/allocator structure it re-hosts on kvmem blocks.

Support policy: the newest minor release of transformers and the one before it, as for vLLM
(`kvmem.integrations.vllm.version`): today 5.24 and 5.23. The upper bound is the next minor
release, not 6, because these internals change between minor releases; a release outside the
range fails loudly at import with one line (the installed release, the range, how to install a
supported one) rather than misbehaving later. The range moves up once a new release's files are
re-read and tests/test_integration_transformers.py passes on it: `make test` runs it on the newest
release (pyproject's `transformers` extra resolves to it) and `make test-transformers-previous` on
the previous one (the Makefile pins it).

What was checked. 5.20.2 to 5.23.0: the continuous-batching files are identical (apart from an
import moved between modules). 5.24.0 (its wheel, against 5.23.0's): `PagedAttentionCache` sizes
heads per tensor-parallel rank (`kv_tp_size`; kvmem refuses tensor parallelism, so its cache keeps
the whole model's heads), `sdpa_attention_forward` no longer takes the paged cache (the mask
module's paged path does), the generation loop runs in the caller's inference mode, and
`generate` takes its cache as ``cache=`` (``past_key_values=`` still works and warns, until
6.0.0): `cache_argument` names the one to use.
"""

from __future__ import annotations

from kvmem.integrations.releases import SupportedReleases

RELEASES = SupportedReleases("transformers", "transformers", minimum="5.23.0", maximum="5.25")
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


def cache_argument(version: str) -> str:
    """The keyword `generate` takes a `Cache` by in transformers `version`.

    Returns:
        "cache" from 5.24 (which renamed it; ``past_key_values`` warns there), "past_key_values" before.
    """
    from packaging.version import Version  # a dependency of transformers

    return "cache" if Version(version).release[:2] >= (5, 24) else "past_key_values"
