"""pytest plugin: run vLLM's own block-pool, prefix-caching and KV-cache-utils tests against kvmem's pool.

    KVMEM_VLLM_POOL=1 KVMEM_VLLM_OUTCOMES=out.json python -m pytest -p kvmem_vllm_pool_plugin tests/v1/core/...

Loaded with ``-p`` from vLLM's own test tree (tests/vllm_upstream/run.py does it, once with
KVMEM_VLLM_POOL=0 for vLLM's stock pool and once with 1). With KVMEM_VLLM_POOL=1, before any test
module is imported, `BlockPool` becomes `kvmem.integrations.vllm.pool.KvmemBlockPool` where vLLM's
tests and vLLM's KV cache coordinator look it up, and the scheduler patches kvmem installs in
production are installed (`pool.install_scheduler_patches`). Every pool is backed by its own kvmem
cache on a host device with 4 KiB pages and 4 blocks per page slot, so that a test's few blocks
span several slots and each test exercises slot mapping; its local budget covers every slot, as a
real budget covers a whole vLLM pool when memory is plentiful. The caches are closed after each
test. Either way, each test's outcome is written to KVMEM_VLLM_OUTCOMES (JSON: ``outcomes``, node
id -> outcome, and ``kvmem_pools``, how many kvmem-backed pools the tests made).
"""

from __future__ import annotations

import json
import os

import pytest

PAGE = 4096
BLOCK_BYTES = 1024  # 4 blocks per page slot
_device = None
_caches: list = []
_pools: list = []  # the kvmem-backed pools of the running test
_made = 0  # kvmem-backed pools made during the session
_outcomes: dict[str, str] = {}


def backing(num_blocks: int):
    """A kvmem cache whose block ``b`` backs vLLM block ``b``, with room for every slot."""
    from kvmem.cache import ElasticKVCache
    from kvmem.device import HostDevice
    from kvmem.page_source import LocalPageSource

    global _device, _made
    _made += 1
    if _device is None:
        _device = HostDevice(granularity=PAGE)
    slots = -(-num_blocks // (PAGE // BLOCK_BYTES))
    source = LocalPageSource(_device, budget_pages=2 * slots, owns_device=False)
    cache = ElasticKVCache(
        source,
        num_layers=1,
        block_size=1,
        num_kv_heads=1,
        head_dim=BLOCK_BYTES,
        dtype="int8",
        max_tokens=num_blocks,
        low_watermark=0,
        high_watermark=0,
        background=False,  # one thread per pool would pile up over thousands of tests
    )
    _caches.append((cache, source))
    return cache


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("KVMEM_VLLM_POOL") != "1":
        return
    import vllm.v1.core.block_pool as block_pool
    import vllm.v1.core.kv_cache_coordinator as kv_cache_coordinator

    from kvmem.integrations.vllm import pool

    class CheckedPool(pool.KvmemBlockPool):
        """kvmem's pool, remembered so that its backing is checked after the test."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _pools.append(self)

    pool.set_backing(backing)
    pool.install_scheduler_patches()
    block_pool.BlockPool = kv_cache_coordinator.BlockPool = CheckedPool


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item):
    """After the test's own teardown: check every pool's backing (a disagreement fails the
    test, as an error in teardown), then close the caches."""
    yield
    try:
        while _pools:
            _pools.pop().check_backing()
    finally:
        _pools.clear()
        while _caches:
            cache, source = _caches.pop()
            cache.close()
            source.close()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A test passes if its call passed and neither its setup nor its teardown failed."""
    if report.outcome != "passed":
        if _outcomes.get(report.nodeid) != "failed":
            _outcomes[report.nodeid] = report.outcome
    elif report.when == "call":
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("KVMEM_VLLM_OUTCOMES")
    if path:
        with open(path, "w") as f:
            json.dump({"kvmem_pools": _made, "outcomes": _outcomes}, f, indent=1, sort_keys=True)
