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
            # exported as it was made, on the worker: granting it makes no driver call
            assert page.export_fd is not None and pool.export_fd(page) == (page.export_fd, False)
        taken = pool.take("m", client_id=1, uid=0, n=36)
        assert len({p.id for p in taken}) == 36 and pool.stats().granted == 36
        pool.give_back([p.id for p in taken], "m")
    finally:
        pool.close()
    assert pool.pages == {}


def pool_with_small_reserve(device: Device, budget_pages: int, release_after: float) -> PagePool:
    """A pool whose configured reserve is 2 (low) to 4 (high) pages, so that what raises it shows."""
    return PagePool(
        device,
        device.granularity,
        budget_pages=budget_pages,
        reserve_low=2,
        reserve_high=4,
        release_after=release_after,
        notify=lambda: None,
    )


def test_the_reserve_follows_the_largest_recent_grow_within_the_budgets_free_part(device: Device):
    pool = pool_with_small_reserve(device, budget_pages=100, release_after=600)
    try:
        wait_for(lambda: pool.stats().created == 4, what="the configured reserve")
        pool.note_grow(20)  # an engine asked for 20 pages: the next 20 and 20 more are made ahead
        assert (pool.reserve_low, pool.reserve_high) == (20, 40)
        wait_for(lambda: pool.stats().free_clean == 40, timeout=60, what="the reserve raised to twice the GROW")
        taken = pool.take("m", client_id=1, uid=0, n=20)  # its GROW: every page was there
        pool.note_grow(5)  # a smaller GROW later does not lower the reserve while the larger one holds
        assert (pool.reserve_low, pool.reserve_high) == (20, 40)
        pool.note_grow(60)  # twice 60 is more than the budget's free part, 100 - 20 granted
        assert (pool.reserve_low, pool.reserve_high) == (60, 80)
        wait_for(lambda: pool.stats().created == 100, timeout=60, what="the whole budget made")
        pool.set_attached(set())  # the engine left: its GROWs size the reserve for the next one still
        assert (pool.reserve_low, pool.reserve_high) == (60, 80)
        pool.give_back([p.id for p in taken], "m")
    finally:
        pool.close()


def test_a_first_burst_raises_both_watermarks_within_the_budget(device: Device):
    pool = pool_with_small_reserve(device, budget_pages=100, release_after=60)
    try:
        pool.set_growth_unit(8)  # a unit of 8 pages: one unit low, two high
        assert (pool.reserve_low, pool.reserve_high) == (8, 16)
        pool.set_growth_unit(8, first_burst=48)  # an engine's first burst to come: 48 pages made and kept
        assert (pool.reserve_low, pool.reserve_high) == (48, 48)
        stats = wait_for(lambda: (s := pool.stats()).free_clean == 48 and s, timeout=60, what="the burst made")
        assert (stats.reserve_low, stats.reserve_high) == (48, 48)
        taken = pool.take("m", client_id=1, uid=0, n=48)
        assert len(taken) == 48
        pool.set_growth_unit(8, first_burst=60)  # a larger burst: only 52 of the budget are not granted
        assert (pool.reserve_low, pool.reserve_high) == (52, 52)
        pool.give_back([p.id for p in taken], "m")
        pool.set_growth_unit(8)  # the burst came: back to the unit
        assert (pool.reserve_low, pool.reserve_high) == (8, 16)
    finally:
        pool.close()


def test_a_raised_reserve_lapses_and_its_surplus_is_released_like_any_other(device: Device):
    pool = pool_with_small_reserve(device, budget_pages=64, release_after=3)
    try:
        pool.note_grow(16)
        wait_for(lambda: pool.stats().pages_created_total >= 32, timeout=60, what="the raised reserve made")
        # No GROW for `release_after` seconds: back to the configured reserve; the surplus above it is
        # released once it has stayed so for `release_after` seconds more.
        stats = wait_for(lambda: (s := pool.stats()).created == 4 and s, timeout=60, what="the surplus released")
        assert stats.pages_released_total == stats.pages_created_total - 4
        assert (pool.reserve_low, pool.reserve_high) == (2, 4)
    finally:
        pool.close()


def test_pages_being_zeroed_count_as_free_and_are_granted_once_zeroed(device: Device):
    """A model gives 3 pages back; the refill zeroes them (the clean floor is 4) while the same
    model asks again with no wait. They are free pages a memset away, not missing ones: `supply`
    counts them free (so the arbiter grants rather than denies) and `take` hands them out zeroed."""
    memset = device.memset
    zeroing, release = threading.Event(), threading.Event()

    def held_memset(address: int, value: int, size: int) -> None:
        zeroing.set()
        release.wait(timeout=60)
        memset(address, value, size)

    pool = PagePool(
        device,
        device.granularity,
        budget_pages=4,
        reserve_low=4,
        reserve_high=4,
        release_after=600,
        notify=lambda: None,
    )
    try:
        wait_for(lambda: pool.stats().free_clean == 4, what="the reserve")
        taken = pool.take("m", client_id=1, uid=0, n=4)
        device.memset = held_memset  # the real memset, held until the test lets it run
        pool.give_back([p.id for p in taken[:3]], "m")
        assert zeroing.wait(timeout=60), "the refill did not zero the returned pages"
        assert pool.supply() == (3, 0, 4, 1)  # being zeroed: free, not "coming" (nothing is made)
        assert pool.take("m", client_id=1, uid=0, n=1) == []  # mid-memset: nothing to hand out yet
        release.set()
        wait_for(lambda: pool.stats().free_clean == 3, what="the batch to be zeroed")
        (page,) = pool.take("m", client_id=1, uid=0, n=1)
        assert device.read(pool.address_of(page.id), 8) == bytes(8)
        pool.give_back([page.id, taken[3].id], "m")
    finally:
        release.set()
        device.memset = memset
        pool.close()


def test_the_free_count_the_grant_path_reads_matches_the_free_lists_through_every_move(device: Device):
    """`supply` counts free pages from the invariant (created, less granted, zeroing and releasing)
    rather than summing the lists on every grant: at each quiet point it equals the lists' sizes."""
    pool = PagePool(
        device,
        device.granularity,
        budget_pages=12,
        reserve_low=2,
        reserve_high=4,
        release_after=3,  # long enough that the checks between a give-back and its release run first
        notify=lambda: None,
    )

    def assert_counts_agree(created: int, granted: int) -> None:
        def agree() -> bool:  # two locked reads: the worker may act between them, so read again
            stats = pool.stats()
            free, coming, created_now, granted_now = pool.supply()
            return (
                (created_now, granted_now) == (stats.created, stats.granted) == (created, granted)
                and free == stats.free_clean + stats.free_dirty == created - granted
                and coming == 12 - created
            )

        wait_for(agree, what=f"the counts to agree at {created} pages made, {granted} granted")

    try:
        pool.set_attached({"a"})  # a's returned pages stay dirty (its own); b's are zeroed ahead
        wait_for(lambda: pool.stats().free_clean == 4, what="the reserve")
        assert_counts_agree(created=4, granted=0)
        taken = pool.take("a", client_id=1, uid=0, n=4)
        wait_for(lambda: pool.stats().free_clean == 4, what="the refill")  # free fell below 2: 4 more made
        assert_counts_agree(created=8, granted=4)
        pool.give_back([p.id for p in taken], "a")  # 8 free, over the high watermark: 4 released
        wait_for(lambda: pool.stats().pages_released_total == 4, timeout=30, what="the surplus released")
        assert_counts_agree(created=4, granted=0)
        taken = pool.take("b", client_id=2, uid=0, n=3)
        wait_for(lambda: pool.stats().free_clean == 4, what="the refill")  # 1 free left: 3 more made
        pool.give_back([p.id for p in taken], "b")  # b has no engine attached: zeroed ahead
        wait_for(lambda: (s := pool.stats()).pages_scrubbed_total >= 3 and s.free_dirty == 0, what="b's pages zeroed")
        assert_counts_agree(created=7, granted=0)
        wait_for(lambda: pool.stats().pages_released_total == 7, timeout=30, what="the surplus released")
        assert_counts_agree(created=4, granted=0)
    finally:
        pool.close()
