"""The daemon's page pool in this process, on both devices: pages created in parallel, all accounted for."""

from __future__ import annotations

import threading

from kvmem.device import Device
from kvmemd.pool import PagePool
from tests.daemon_support import wait_for


def test_the_reserve_is_created_by_the_creation_threads_and_every_page_is_accounted_for(device: Device):
    page_size = device.granularity
    creators: list[str] = []
    create_page = device.create_page

    def recording_create_page(size: int | None = None):
        creators.append(threading.current_thread().name)
        return create_page(size)

    device.create_page = recording_create_page  # the real call, with the thread that makes it noted
    ready = threading.Event()
    pool = PagePool(
        device, page_size, budget_pages=40, reserve_low=36, reserve_high=36, release_after=60, notify=ready.set
    )
    try:
        wait_for(lambda: pool.stats().created == 36, timeout=60, what="the reserve to be created")
        stats = pool.stats()
        assert (stats.free_clean, stats.granted, stats.pages_created_total) == (36, 0, 36)
        assert len(creators) == 36 and all(name.startswith("kvmemd-pool-create") for name in creators)
        # Every page has its own id and is mapped at its place in the daemon's range, zeroed.
        assert sorted(pool.pages) == list(range(36))
        for page_id, page in pool.pages.items():
            assert page.mapping.address == pool.address_of(page_id)
            assert device.read(pool.address_of(page_id) + page_size - 8, 8) == bytes(8)
        taken = pool.take("m", client_id=1, uid=0, n=36)
        assert len({p.id for p in taken}) == 36 and pool.stats().granted == 36
        pool.give_back([p.id for p in taken], "m")
    finally:
        pool.close()
    assert pool.pages == {}
