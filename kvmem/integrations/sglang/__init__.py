"""kvmem for SGLang: the KV pool and paged allocator on kvmem, switched on by KVMEM=1.

    pip install . sglang==0.5.23    # kvmem from its clone registers an sglang.srt.platforms entry point
    KVMEM=1 KVMEM_MODEL=llama-8b python -m sglang.launch_server --page-size 16 ...   # pages from kvmemd
    KVMEM=1 KVMEM_DEVICE=host KVMEM_BUDGET=8GiB SGLANG_USE_CPU_ENGINE=1 ...          # CPU, no daemon

Design note
-----------
SGLang discovers platform plugins through the ``sglang.srt.platforms`` entry-point group in every
process that touches `current_platform` (sglang/srt/platforms/__init__.py, 0.5.23). kvmem's entry
point is `activate`: without KVMEM=1 it returns None and SGLang picks its own platform, so
installing kvmem beside SGLang changes nothing. With KVMEM=1 it names `platform.KvmemPlatform`,
whose import checks the SGLang version (`version.SUPPORTED`) and the device and fails loudly
(`UnsupportedSglangError`) rather than letting SGLang run without kvmem. That platform returns
`KvmemMHATokenToKVPool` (pool.py) and `KvmemPagedTokenToKVPoolAllocator` (allocator.py) from
SGLang's official hooks; `kvctl sleep` and `wake` are carried out on SGLang's scheduler thread
(drain.py). Another platform plugin active at the same time makes SGLang ask for
SGLANG_PLATFORM; SGLANG_PLATFORM=kvmem selects this one.

This module imports nothing from SGLang or torch: SGLang imports every platform plugin's module.
"""

from __future__ import annotations

import os

from kvmem.integrations.sglang.version import SUPPORTED, UnsupportedSglangError, check_sglang_version

PLATFORM = "kvmem.integrations.sglang.platform:KvmemPlatform"


def enabled() -> bool:
    """Whether KVMEM=1 asks for kvmem in this SGLang process."""
    return os.environ.get("KVMEM") == "1"


def activate() -> str | None:
    """The ``sglang.srt.platforms`` entry point: with KVMEM=1, the name of kvmem's platform class."""
    return PLATFORM if enabled() else None


__all__ = ["PLATFORM", "SUPPORTED", "UnsupportedSglangError", "activate", "check_sglang_version", "enabled"]
