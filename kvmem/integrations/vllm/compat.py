"""Where each supported vLLM release keeps what kvmem replaces: one adapter per minor release.

Design note
-----------
kvmem's vLLM integration is one body of code (`allocation`, `budget`, `pool`) over the vLLM
internals its `version` module lists. Between the releases it supports, most of those internals
kept their names and contracts; the few that moved are recorded here, one `VllmAdapter` per
minor release, and the one matching the installed vLLM is chosen once, when this module is
imported (`ADAPTER`; the plugin imports it only with KVMEM=1, after the version check, so an
unsupported release fails with `UnsupportedVllmError` naming the range before anything is patched).

What moved from vLLM 0.32.0 to 0.33.0 (read from both releases' wheels, `vllm/v1/...`):

- `may_override_num_blocks` (where kvmem rounds the block count to whole page slots): defined in
  `core/kv_cache_utils.py` in 0.32; in 0.33 that module was split, and it is defined, and called
  by `get_kv_cache_config_from_groups` through its module global, in `core/kv_cache_planning.py`
  (`v1/hisparse/layout.py` imports it from there inside a function, so patching the module
  reaches it too).

What did not, and so needs no adapter (checked in the same files): `allocate_kv_cache`
(`worker/utils.py` is identical) and the three modules that import it by name
(`worker/gpu_model_runner.py`, `worker/gpu/attn_utils.py`, `hisparse/binding.py`);
`create_kv_cache_views`, `KVCacheConfig.num_blocks_of` and the `KVCacheLayout` flags; the workers'
`determine_available_memory` and its `kv_cache_memory_bytes` branch; `Scheduler.schedule`;
`KVCacheCoordinator.get_num_blocks_to_allocate` (its arguments changed, and kvmem's wrapper passes
them through); and `BlockPool`'s methods and free queue. 0.33's `BlockPool` takes one more keyword,
`num_hash_lookahead_tokens`, which `KvmemBlockPool` passes on with the rest, and its `touch` and
`free_blocks` now skip the null block instead of counting it (kvmem never counts the null block
from `ref_cnt`: it holds it for as long as the model is awake).
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import Version

from kvmem.integrations.vllm.version import RELEASES, UnsupportedVllmError, check_vllm_version


@dataclass(frozen=True)
class VllmAdapter:
    """Where one vLLM minor release keeps the internals that moved between supported releases.

    Attributes:
        release: The minor release it is for ("0.33").
        num_blocks_module: The module that defines `may_override_num_blocks` and whose
            `get_kv_cache_config_from_groups` calls it through the module's own global.
    """

    release: str
    num_blocks_module: str


ADAPTERS = (
    VllmAdapter("0.32", num_blocks_module="vllm.v1.core.kv_cache_utils"),
    VllmAdapter("0.33", num_blocks_module="vllm.v1.core.kv_cache_planning"),
)


def adapter_for(version: str) -> VllmAdapter:
    """The adapter for vLLM release `version` ("0.33.0", "0.32.0+cpu").

    Raises:
        UnsupportedVllmError: `version` is outside `version.SUPPORTED` (the message names the range).
    """
    check_vllm_version(version)
    minor = ".".join(map(str, Version(version).release[:2]))
    for adapter in ADAPTERS:
        if adapter.release == minor:
            return adapter
    # A release in the range without an adapter means the range was widened without one.
    raise UnsupportedVllmError(
        f"kvmem's vLLM integration has no adapter for vllm {version} although {RELEASES.spec} includes it; "
        "this is a kvmem bug: please report it"
    )


ADAPTER = adapter_for(check_vllm_version())
