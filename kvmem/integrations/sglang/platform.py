"""The SGLang platform kvmem switches in: SGLang's own CUDA or CPU platform, with kvmem's KV pool and allocator.

Design note
-----------
SGLang 0.5.23 picks one platform per process (sglang/srt/platforms/__init__.py `_resolve_platform`,
on first access to `current_platform`): it calls every ``sglang.srt.platforms`` entry point (only
the one named by SGLANG_PLATFORM, if set); one that returns a class name wins over the in-tree
device detection, and the class is imported and instantiated outside any try block. kvmem's entry
point (`kvmem.integrations.sglang.activate`) returns this module's `KvmemPlatform`, so importing
this module is where the checks happen, loudly: an exception here propagates out of SGLang's first
use of `current_platform`, whereas one raised by an entry point itself is only logged when
SGLANG_PLATFORM is unset, and SGLang would run without kvmem.

`KvmemPlatform` is SGLang's own platform for the device (the in-tree `CpuSRTPlatform` when
SGLANG_USE_CPU_ENGINE=1, as SGLang's detection checks first; else `CudaSRTPlatform` when CUDA
is available; else the base `SRTPlatform` SGLang itself falls back to, whose pools run on
``device="cpu"``) with two hooks overridden (sglang/srt/platforms/interface.py):
- `get_kv_pool_cls(kind="mha")` -> `KvmemMHATokenToKVPool`; the configurator builds it with the
  in-tree keyword arguments wherever it builds an MHA pool (kv_cache_configurator.py
  `_resolve_kv_pool_class`). MLA and DSA pools are not on kvmem: asking for one raises.
- `get_paged_allocator_cls()` -> `KvmemPagedTokenToKVPoolAllocator`, honored wherever SGLang builds
  a paged allocator (the plain MHA branch and inside the SWA allocator).
"""

from __future__ import annotations

import os

import torch

from kvmem.integrations.sglang.version import UnsupportedSglangError, check_sglang_version

check_sglang_version()  # before importing the SGLang internals the classes below rely on

from sglang.srt.platforms.cpu import CpuSRTPlatform  # noqa: E402
from sglang.srt.platforms.cuda import CudaSRTPlatform  # noqa: E402
from sglang.srt.platforms.interface import SRTPlatform  # noqa: E402


def _base_platform() -> type:
    """SGLang's in-tree platform for this process, found in the order `_resolve_platform` checks.

    CPU engine, CUDA, or none of the accelerators SGLang knows (its base `SRTPlatform`, where
    pools live on ``device="cpu"``) are served; ROCm, NPU, XPU, MUSA and MPS are not (no kvmem
    device layer for them).
    """
    if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1":
        return CpuSRTPlatform
    if torch.cuda.is_available():
        if torch.version.hip is not None:
            raise UnsupportedSglangError(
                "KVMEM=1: kvmem's SGLang integration runs on CUDA GPUs or the CPU, not ROCm. "
                "Unset KVMEM to run SGLang without kvmem"
            )
        return CudaSRTPlatform
    others = {
        "NPU": hasattr(torch, "npu") and torch.npu.is_available(),
        "XPU": torch.xpu.is_available(),
        "MPS": getattr(torch, "mps", None) is not None and torch.mps.is_available(),
    }
    for name, available in others.items():
        if available:
            raise UnsupportedSglangError(
                f"KVMEM=1: kvmem's SGLang integration runs on CUDA GPUs or the CPU, not {name}. "
                "Unset KVMEM to run SGLang without kvmem"
            )
    return SRTPlatform


class _KvmemHooks:
    """The platform hooks kvmem overrides; mixed in before SGLang's platform class."""

    def get_kv_pool_cls(self, *, kind: str) -> type | None:
        if kind == "mha":
            # Imported here, not at the top: memory_pool.py reads `current_platform` at import, and
            # this module is imported while SGLang resolves it.
            from kvmem.integrations.sglang.pool import KvmemMHATokenToKVPool

            return KvmemMHATokenToKVPool
        raise UnsupportedSglangError(
            f"kvmem's SGLang integration holds MHA KV pools only; this model needs a {kind!r} pool. "
            "Unset KVMEM to run it without kvmem"
        )

    def get_paged_allocator_cls(self) -> type | None:
        from kvmem.integrations.sglang.allocator import KvmemPagedTokenToKVPoolAllocator  # as above

        return KvmemPagedTokenToKVPoolAllocator


KvmemPlatform = type("KvmemPlatform", (_KvmemHooks, _base_platform()), {"__module__": __name__})
