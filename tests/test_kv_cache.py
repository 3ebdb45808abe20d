"""The elastic KV cache on HostDevice and on the fake CUDA driver, with and without the daemon."""

from __future__ import annotations

import ctypes
import random
import threading
import time
from pathlib import Path

import pytest
import torch

import kvmem
import kvmem.kernels
from kvmem import KVCacheFull
from kvmem.cache import ElasticKVCache
from kvmem.common.layout import DTYPES, KVLayout
from kvmem.control import ControlClient
from kvmem.device import open_device
from kvmem.page_source import LocalPageSource, PageListener, Shortfall
from kvmem.session import Session
from tests.daemon_support import DaemonProcess, wait_for
from tests.support import FAKE, GrowthClock

MiB = 1 << 20
GEOMETRY = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 64}  # 4 KiB blocks in fp16


def host_view(cache: ElasticKVCache, layer: int, kind: str) -> torch.Tensor:
    """A CPU byte view of one layer range. Valid on the host device and on the fake driver, whose
    "device" memory is host memory; on a real GPU the tensors are `cache.k` / `cache.v`."""
    address = cache.range_address(layer, kind)
    return torch.frombuffer((ctypes.c_ubyte * cache.range_bytes).from_address(address), dtype=torch.uint8)


def block_bytes(cache: ElasticKVCache, layer: int, kind: str, block: int) -> bytes:
    return cache.device.read(cache.block_address(layer, kind, block), cache.block_bytes)


@pytest.fixture(params=["host", "cuda"])
def session(request: pytest.FixtureRequest):
    with kvmem.local(device=request.param, budget="64MiB") as s:
        yield s


def test_geometry_and_layout(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=10_000)
    assert cache.block_bytes == 16 * 2 * 64 * 2
    assert cache.blocks_per_slot == (2 * MiB) // cache.block_bytes == 512
    assert cache.max_blocks == 1024  # 10,000 tokens = 625 blocks, rounded up to whole slots
    assert cache.range_bytes == 2 * 2 * MiB
    assert cache.range_address(1, "v") == cache.reservation.address + 3 * cache.range_bytes
    if session.device.kind == "host":
        assert [tuple(t.shape) for t in cache.k] == [(1024, 16, 2, 64)] * 2
        assert cache.k[0].dtype == torch.float16 and cache.k[0].is_contiguous()
        assert cache.k[1].data_ptr() == cache.range_address(1, "k")


def test_a_block_size_that_does_not_divide_the_page_uses_multi_page_slots(session):
    cache = session.kv_cache(num_layers=1, block_size=16, num_kv_heads=1, head_dim=80, max_tokens=5000)
    # 2,560-byte blocks: the least common multiple with 2 MiB pages is 5 pages of 819 blocks.
    assert (cache.block_bytes, cache.pages_per_slot, cache.blocks_per_slot) == (2560, 5, 4096)
    ids = cache.alloc(4096)
    assert cache.stats().pages_held == 10  # 5 pages in each of K and V
    host_view(cache, 0, "v")[: 4096 * 2560] = 7  # the whole slot is mapped and writable
    cache.free(ids)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_views_alias_exactly_their_blocks(dtype: str, layout: str):
    with kvmem.local(device="host", budget="64MiB") as s:
        cache = s.kv_cache(**GEOMETRY, dtype=dtype, layout=layout, max_tokens=16384, background=False)
        ids = cache.alloc(300)
        generator = torch.Generator().manual_seed(0)
        for layer in range(2):
            for kind, tensors in (("k", cache.k), ("v", cache.v)):
                block = ids[1 + layer * 7 + (kind == "v") * 3]
                data = torch.randint(-100, 100, tuple(tensors[layer].shape[1:]), generator=generator)
                tensors[layer][block] = data.to(tensors[layer].dtype)
                expected = tensors[layer][block].contiguous().view(torch.uint8).flatten().numpy().tobytes()
                assert block_bytes(cache, layer, kind, block) == expected
                # Neighbours are untouched (the blocks were zero when mapped).
                for other in (block - 1, block + 1):
                    assert block_bytes(cache, layer, kind, other) == bytes(cache.block_bytes)
        # And the other way round: bytes written at a block's address show in that block only.
        cache.device.memset(cache.block_address(1, "v", ids[5]), 0x3C, cache.block_bytes)
        raw = cache.v[1][ids[5]].contiguous().view(torch.uint8)
        assert bool((raw == 0x3C).all())
        assert bool((cache.v[1][ids[6]].contiguous().view(torch.uint8) == 0).all())
        cache.free(ids)


def test_reservation_tensor_is_every_range_in_order():
    with kvmem.local(device="host", budget="64MiB") as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=16384, background=False)
        ids = cache.alloc(cache.max_blocks)  # every slot mapped: the whole reservation is readable
        flat = cache.reservation_tensor()
        assert (flat.dtype, flat.numel(), flat.data_ptr()) == (
            torch.uint8,
            4 * cache.range_bytes,
            cache.reservation.address,
        )
        cache.v[1][ids[3]] = 2.0
        start = cache.block_address(1, "v", ids[3]) - cache.reservation.address
        assert flat[start : start + cache.block_bytes].view(torch.float16).tolist() == [2.0] * (16 * 2 * 64)
        assert int(flat.count_nonzero()) == cache.block_bytes // 2  # only that block's halves are nonzero
        cache.free(ids)


def test_growth_sets_access_once_per_range_per_contiguous_run():
    with kvmem.local(device="cuda", budget="64MiB") as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=8 * 512 * 16, background=False)
        FAKE.reset_call_counters()
        ids = cache.alloc(3 * 512 - 20)  # three slots at once
        assert FAKE.counter("cuMemMap") == 3 * 4
        assert FAKE.counter("cuMemSetAccess") == 4  # one per range: K0, V0, K1, V1
        assert cache.stats().mapped_slots == 3 and cache.stats().grows == 1
        assert FAKE.counter("cuMemCreate") == 12
        FAKE.reset_call_counters()
        more = cache.alloc(10)  # free blocks exist: no driver call at all
        assert sum(v for k, v in FAKE.counters().items() if not k.startswith("live.")) == 0
        cache.free(ids + more)


def test_alloc_fills_the_fewest_slots_and_never_uses_an_unmapped_one(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=10 * 512 * 16, background=False)
    first = cache.alloc(600)  # slot 0 full, 88 blocks of slot 1
    assert first == list(range(600))
    cache.free(list(range(100, 200)))  # a hole in slot 0
    again = cache.alloc(50)
    assert again == list(range(100, 150))  # the fullest slot (slot 0) is filled first
    for block in first + again:
        assert cache.is_slot_mapped(block // cache.blocks_per_slot)
    assert cache.stats().mapped_slots == 2


def test_running_out_is_kv_cache_full_and_allocates_nothing():
    with kvmem.local(device="host", budget="16MiB") as s:  # 8 pages = 2 slots of 4 ranges
        cache = s.kv_cache(**GEOMETRY, max_tokens=100_000, background=False, grow_wait=0.1)
        ids = cache.alloc(1000)
        with pytest.raises(KVCacheFull) as info:
            cache.alloc(100)
        assert (info.value.requested, info.value.available, info.value.reason) == (100, 24, "budget")
        assert cache.get_num_used_blocks() == 1000
        assert cache.alloc(24) == list(range(1000, 1024))
        cache.free(ids)


def test_shrink_returns_only_empty_slots_after_synchronizing(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=10 * 512 * 16, background=False)
    ids = cache.alloc(3 * 512)
    host_view(cache, 0, "k")[:16] = 9
    cache.free(ids[1:512] + ids[512:1024])  # slot 0 keeps block 0; slot 1 empties; slot 2 stays full
    synchronizes = FAKE.counter("cuCtxSynchronize")
    assert cache.shrink() == 1
    if session.device.kind == "cuda":
        assert FAKE.counter("cuCtxSynchronize") > synchronizes
    assert cache.stats().mapped_slots == 2 and not cache.is_slot_mapped(1)
    assert bytes(host_view(cache, 0, "k")[:16]) == b"\x09" * 16  # the live block's slot is intact
    # Slot 0's free blocks first; slot 2 is full, so the last block comes from slot 1, mapped anew.
    assert cache.alloc(512) == [*range(1, 512), 512]
    cache.free([*range(513), *range(1024, 1536)])


def test_background_thread_grows_ahead_of_demand(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=10 * 512 * 16, low_watermark=256, high_watermark=700)
    wait_for(lambda: cache.get_num_free_blocks() >= 700, what="growth to the high watermark")
    assert cache.stats().mapped_slots == 2
    grows = cache.stats().grows
    ids = cache.alloc(800)  # 224 free left, below the low watermark: the thread grows again
    wait_for(lambda: cache.get_num_free_blocks() >= 700, what="growth after demand")
    assert cache.stats().grows > grows
    cache.free(ids)


def test_two_engine_threads_allocating_and_freeing_while_the_cache_grows_and_shrinks(session):
    """alloc/free/take from two threads at once while the background thread keeps the watermarks
    (mapping and unmapping slots): no block is ever held twice, and the accounting is exact after."""
    cache = session.kv_cache(**GEOMETRY, max_tokens=12 * 512 * 16, low_watermark=300, high_watermark=600)
    owner: dict[int, int] = {}
    guard = threading.Lock()
    errors: list[BaseException] = []

    def engine(me: int) -> None:
        rng = random.Random(me)
        held: list[list[int]] = []
        try:
            for step in range(400):
                if held and (rng.random() < 0.5 or len(held) > 8):
                    batch = held.pop(rng.randrange(len(held)))
                    with guard:
                        for b in batch:
                            assert owner.pop(b) == me
                    cache.free(batch[::-1] if step % 2 else batch)
                    continue
                try:
                    got = cache.alloc(rng.choice([1, 16, 200, 700]))
                except KVCacheFull:  # the budget ran out: the other thread holds the rest
                    continue
                with guard:
                    for b in got:
                        assert b not in owner, f"block {b} handed to {me} while {owner[b]} holds it"
                        owner[b] = me
                held.append(got)
            for batch in held:
                with guard:
                    for b in batch:
                        owner.pop(b)
                cache.free(batch)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=engine, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    stats = cache.stats()
    assert stats.used_blocks == 0 and cache.get_num_used_blocks() == 0
    assert stats.free_blocks == cache.get_num_free_blocks() == stats.mapped_slots * cache.blocks_per_slot
    cache._state.allocator._check()
    cache.close()


def test_the_gate_refuses_alloc_and_take_while_asleep_or_closed(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=4 * 512 * 16, low_watermark=0, high_watermark=0, background=False)
    ids = cache.alloc(3)
    cache._state.asleep = True  # what a sleep request sets first, before the engine's hooks run
    for call in (lambda: cache.alloc(1), lambda: cache.take([3])):
        with pytest.raises(KVCacheFull) as info:
            call()
        assert info.value.reason == "asleep"
    cache.free(ids)  # the engine drains: free still works
    cache._state.asleep = False
    assert cache.alloc(2) == [0, 1]
    cache.close()
    for call in (lambda: cache.alloc(1), lambda: cache.take([3]), lambda: cache.alloc(0)):
        with pytest.raises(RuntimeError, match="the KV cache is closed"):
            call()


def test_session_close_returns_every_page():
    for kind in ("host", "cuda"):
        s = kvmem.local(device=kind, budget="64MiB")
        cache = s.kv_cache(**GEOMETRY, max_tokens=100_000)
        cache.alloc(2000)
        assert s.source.held_pages
        cache.close()  # the cache itself gives every page back (the source's close would hide it)
        assert not s.source.held_pages and cache.reservation.closed
        s.close()
        s.close()
    assert FAKE.counter("live.handles") == 0 and FAKE.counter("live.mappings") == 0


def test_bad_geometry_is_refused(session):
    with pytest.raises(ValueError, match="head_dim=0: it must be a positive integer"):
        session.kv_cache(num_layers=2, block_size=16, num_kv_heads=2, head_dim=0)
    with pytest.raises(ValueError, match="dtype 'float64' is not one of"):
        session.kv_cache(**GEOMETRY, dtype="float64")
    with pytest.raises(ValueError, match="layout 'NCHW' is not one of NHD, HND"):
        session.kv_cache(**GEOMETRY, layout="NCHW")


# ---- with the daemon ----


@pytest.fixture(params=["host", "cuda"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path):
    with DaemonProcess(tmp_path / "rt", request.param, "64MiB", "--reserve", "0", "8") as d:
        yield d


def test_a_limit_set_before_the_engine_starts_is_its_cache_target_from_the_start(daemon: DaemonProcess):
    """`kvctl limit llama 8MiB` before the server starts: the daemon sends the engine its POLICY at
    HELLO, before the engine made its cache; the cache starts with that target, not with none."""
    with ControlClient(runtime_dir=daemon.runtime_dir) as control:
        control.set_limit("early", 8 * MiB)  # 4 pages: one slot
    with kvmem.connect("early", runtime_dir=daemon.runtime_dir) as s:
        wait_for(lambda: s.source.policy.limit_pages == 4, what="the POLICY at HELLO")
        cache = s.kv_cache(**GEOMETRY, max_tokens=20 * 512 * 16, low_watermark=0, high_watermark=0)
        assert cache.target_pages == 4


def test_a_model_put_to_sleep_before_its_engine_made_its_cache_starts_asleep(daemon: DaemonProcess):
    with (
        kvmem.connect("early", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        control.sleep("early")  # no cache yet, no page held: the client says it slept
        daemon.wait_for_model("early", lambda m: m.state.name == "ASLEEP", what="asleep")
        cache = s.kv_cache(**GEOMETRY, max_tokens=20 * 512 * 16, low_watermark=0, high_watermark=0)
        wait_for(lambda: cache.asleep, what="the cache to start asleep")
        with pytest.raises(KVCacheFull, match="asleep"):
            cache.alloc(1)
        control.wake("early")
        wait_for(lambda: not cache.asleep, what="the wake")
        assert len(cache.alloc(1)) == 1


def test_an_engine_that_counts_its_own_blocks_reports_the_slots_in_use(daemon: DaemonProcess):
    """vLLM's ranks mark every block of their slots in use; the scheduler's count of slots holding live
    blocks is what the daemon must see (its USED, and whom it asks for idle pages)."""
    with kvmem.connect("counted", runtime_dir=daemon.runtime_dir) as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=20 * 512 * 16, low_watermark=0, high_watermark=0)
        held = cache.alloc(3 * cache.blocks_per_slot)  # 3 slots, every block in use by the cache's count
        daemon.wait_for_model("counted", lambda m: m.used_pages == 12, what="the cache's own count")
        cache.report_engine_usage(1)
        daemon.wait_for_model("counted", lambda m: m.used_pages == 4, what="the engine's count")
        cache.free(held[: cache.blocks_per_slot])
        assert cache.shrink() == 1  # reports usage again: by its own count 2 slots, but the engine's stands
        daemon.wait_for_model("counted", lambda m: (m.mapped_pages, m.used_pages) == (8, 4), what="the shrink")
        cache.report_engine_usage(99)  # never more than what is mapped
        daemon.wait_for_model("counted", lambda m: m.used_pages == 8, what="the count clipped to 2 slots")


def test_daemon_backed_cache_grows_and_the_daemon_sees_it(daemon: DaemonProcess):
    with kvmem.connect("cache-test", runtime_dir=daemon.runtime_dir) as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=20 * 512 * 16, low_watermark=0, high_watermark=0)
        ids = cache.alloc(1500)  # 3 slots x 4 ranges = 12 pages
        host_view(cache, 1, "v")[:4096] = 5
        status = wait_for(lambda: (m := daemon.status().model("cache-test")) and m.mapped_pages == 12 and m)
        assert cache.stats().pages_held == 12
        daemon.wait_for_model("cache-test", lambda m: m.used_pages == 12, what="usage reported")
        cache.free(ids)
        cache.shrink()
        daemon.wait_for_model("cache-test", lambda m: m.mapped_pages == 0, what="pages returned")
        assert status.state.name == "AWAKE"
        with ControlClient(runtime_dir=daemon.runtime_dir) as control:  # the daemon holds the cache's layout
            (model,) = control.status()["models"]
        assert model["layout"] == cache.layout_descriptor.to_dict()
    wait_for(lambda: daemon.status().daemon.pages_granted == 0)


def test_a_layout_that_does_not_add_up_costs_the_engine_its_connection(daemon: DaemonProcess):
    with kvmem.connect("liar", runtime_dir=daemon.runtime_dir, reconnect=False) as s:
        layout = KVLayout.derive(1, 16, 1, 64, "float16", "NHD", s.source.page_size, 1024).to_dict()
        layout["block_bytes"] += 1
        s.source.describe(layout)
        wait_for(lambda: not s.source.connected.is_set(), what="the daemon to drop the engine")
    assert "layout descriptor: block_bytes=2049 does not match the geometry" in daemon.log()


def test_a_lowered_limit_is_met_as_blocks_are_freed(daemon: DaemonProcess):
    with (
        kvmem.connect("limited", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as c,
    ):
        cache = s.kv_cache(**GEOMETRY, max_tokens=20 * 512 * 16, low_watermark=0, high_watermark=0)
        ids = cache.alloc(3 * 512)
        c.set_limit("limited", 4 * 2 * MiB)  # one slot's worth of pages
        time.sleep(0.2)
        assert cache.stats().mapped_slots == 3  # every slot holds live blocks: nothing is unmapped
        cache.free(ids[512:])  # slots 1 and 2 empty out
        wait_for(lambda: cache.stats().mapped_slots == 1, what="the cache to settle at the limit")
        daemon.wait_for_model("limited", lambda m: m.mapped_pages == 4)
        with pytest.raises(KVCacheFull) as info:
            cache.alloc(512 + 1)
        assert info.value.reason == "limit"
        cache.free(ids[:512])


def test_daemon_pressure_takes_empty_slots_from_an_idle_cache(tmp_path: Path):
    with (
        DaemonProcess(tmp_path / "rt", "host", "32MiB", "--reserve", "0", "0") as daemon,  # 16 pages = 4 slots
        kvmem.connect("idle", runtime_dir=tmp_path / "rt") as idle_session,
        kvmem.connect("busy", runtime_dir=tmp_path / "rt") as busy_session,
    ):
        # A high watermark of 4 slots: the idle cache keeps its empty slots until asked for them.
        idle = idle_session.kv_cache(**GEOMETRY, max_tokens=8 * 512 * 16, low_watermark=0, high_watermark=4 * 512)
        busy = busy_session.kv_cache(**GEOMETRY, max_tokens=8 * 512 * 16, low_watermark=0, high_watermark=0)
        idle.free(idle.alloc(4 * 512))  # all 4 slots mapped, none in use
        assert idle.stats().mapped_slots == 4
        ids = busy.alloc(2 * 512)  # the daemon asks idle for 8 pages back
        assert busy.stats().mapped_slots == 2
        assert idle.stats().mapped_slots == 2
        daemon.wait_for_model("idle", lambda m: m.reclaims >= 1, what="the reclaim to be published")
        busy.free(ids)


def test_an_idle_cache_shrinks_to_its_live_blocks_plus_the_watermark(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=20 * 512 * 16, low_watermark=100, high_watermark=512)
    ids = cache.alloc(7 * 512)
    assert cache.stats().mapped_slots >= 7
    cache.free(ids[: 6 * 512 + 500])  # 12 blocks live, all in the last slot
    live_floor = 1
    wait_for(
        lambda: cache.stats().mapped_slots <= live_floor + 2 and cache.get_num_free_blocks() >= 512,
        what="the idle cache to give its empty slots back",
    )
    assert cache.get_num_used_blocks() == 12
    cache.free(ids[6 * 512 + 500 :])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_after_a_random_trace_the_cache_rests_holding_no_empty_slot(seed: int):
    """At rest (watermarks 0) every mapped slot holds a live block, and the page-aware allocator
    keeps the live blocks packed within a few slots of the floor; `compact()` (the engine applying
    the moves) brings it to the floor exactly."""
    rng = random.Random(seed)
    with kvmem.local(device="host", budget="256MiB") as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=64 * 512 * 16, low_watermark=0, high_watermark=0)
        live: list[list[int]] = []
        for _ in range(400):
            if live and rng.random() < 0.45:
                cache.free(live.pop(rng.randrange(len(live))))
            else:
                live.append(cache.alloc(rng.randint(1, 300)))
        live_slots = {block // cache.blocks_per_slot for ids in live for block in ids}
        wait_for(lambda: cache.stats().mapped_slots == len(live_slots), what="the empty slots to go back")
        floor = -(-cache.get_num_used_blocks() // cache.blocks_per_slot)
        assert floor <= cache.stats().mapped_slots <= floor + 3
        moved = cache.compact()
        live = [[moved.get(block, block) for block in ids] for ids in live]
        assert cache.stats().mapped_slots == floor
        assert len({block // cache.blocks_per_slot for ids in live for block in ids}) == floor


def test_sleep_returns_every_page_as_blocks_drain_and_wake_serves_again(daemon: DaemonProcess):
    with (
        kvmem.connect("sleeper", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as c,
    ):
        s.on_sleep(lambda offload: None)  # a drain hook; the test frees the blocks itself below
        cache = s.kv_cache(**GEOMETRY, max_tokens=20 * 512 * 16, low_watermark=0, high_watermark=0)
        ids = cache.alloc(2 * 512)
        c.sleep("sleeper")
        time.sleep(0.2)
        assert cache.stats().mapped_slots == 2  # live blocks: nothing is taken from under the engine
        cache.free(ids)  # the engine drains
        daemon.wait_for_model("sleeper", lambda m: m.state.name == "ASLEEP", what="asleep")
        assert cache.stats().mapped_slots == 0 and daemon.status().model("sleeper").mapped_pages == 0
        with pytest.raises(KVCacheFull) as info:
            cache.alloc(1)
        assert info.value.reason == "asleep"
        c.wake("sleeper")
        daemon.wait_for_model("sleeper", lambda m: m.state.name == "AWAKE")
        wait_for(lambda: not cache.asleep, what="the wake to reach the cache")
        cache.free(cache.alloc(600))


def test_compaction_packs_live_blocks_to_the_floor_and_keeps_their_bytes(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=16 * 8 * 512, low_watermark=0, high_watermark=0, background=False)
    per_slot = cache.blocks_per_slot
    rng = random.Random(7)
    live: list[int] = []
    for ids in [cache.alloc(n) for n in (300, 500, 700, 400, 600)]:
        keep = rng.sample(ids, len(ids) // 3)  # requests finish unevenly: every slot is part used
        cache.free(sorted(set(ids) - set(keep)))
        live += keep
    for i, block in enumerate(live):
        for layer in range(cache.num_layers):
            for kind in ("k", "v"):
                cache.device.memset(
                    cache.block_address(layer, kind, block),
                    (i * 7 + layer * 2 + (kind == "v")) % 251,
                    cache.block_bytes,
                )
    floor = -(-len(live) // per_slot)
    assert cache.stats().mapped_slots == 5 > floor == 2
    moved = cache.compact()
    assert cache.stats().mapped_slots == floor and cache.get_num_used_blocks() == len(live)
    new_ids = [moved.get(block, block) for block in live]
    assert len(set(new_ids)) == len(live) and len({b // per_slot for b in new_ids}) == floor
    for i, block in enumerate(new_ids):
        for layer in range(cache.num_layers):
            for kind in ("k", "v"):
                expected = bytes([(i * 7 + layer * 2 + (kind == "v")) % 251]) * cache.block_bytes
                assert block_bytes(cache, layer, kind, block) == expected
    assert cache.compact() == {}  # packed already
    cache.free(new_ids)


def test_compaction_moves_every_layers_blocks_in_one_kernel_launch_exactly(monkeypatch: pytest.MonkeyPatch):
    """On tensors, compaction is one `kvmem.kernels.move_blocks` launch (the Triton interpreter here): each
    moved block's bytes land exactly at its new id in every layer's K and V, and no other byte of the kept slot
    changes."""
    launches = []
    move_blocks = kvmem.kernels.move_blocks

    def spy(keys, values, src, dst, **options):
        launches.append((src.tolist(), dst.tolist()))
        move_blocks(keys, values, src, dst, **options)

    monkeypatch.setattr(kvmem.kernels, "move_blocks", spy)
    with kvmem.local(device="host", budget="64MiB") as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 8 * 512, low_watermark=0, high_watermark=0, background=False)
        per_slot = cache.blocks_per_slot
        ids = cache.alloc(3 * per_slot)
        assert sorted({b // per_slot for b in ids}) == [0, 1, 2]
        rng = random.Random(11)
        first, rest = [b for b in ids if b < per_slot], [b for b in ids if b >= per_slot]
        live = set(first[:300]) | set(rng.sample(rest, 120))  # slot 0 the fullest: the one kept
        cache.free(sorted(set(ids) - live))
        mapped = 3 * cache.slot_bytes
        generator = torch.Generator().manual_seed(5)
        views = [host_view(cache, layer, kind)[:mapped] for layer in range(cache.num_layers) for kind in ("k", "v")]
        for view in views:
            view.copy_(torch.randint(0, 256, (mapped,), dtype=torch.uint8, generator=generator))
        before = [view.clone().view(-1, cache.block_bytes) for view in views]
        moved = cache.compact()
        assert sorted(moved) == sorted(b for b in live if b >= per_slot)  # every live block off slot 0
        assert all(dst < per_slot and dst not in live for dst in moved.values())
        assert launches == [(list(moved), list(moved.values()))]
        for old, view in zip(before, views, strict=True):
            expected = old[:per_slot].clone()
            for src, dst in moved.items():
                expected[dst] = old[src]
            assert torch.equal(view[: cache.slot_bytes].view(-1, cache.block_bytes), expected)
        assert cache.stats().mapped_slots == 1 and cache.get_num_used_blocks() == len(live)


# ---- engines that choose their own blocks (map_slots, take, the engine hooks) ----


def test_map_slots_maps_exactly_the_slots_asked_for_and_take_marks_chosen_blocks(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=4 * 512 * 16, low_watermark=0, high_watermark=0, background=False)
    per_slot = cache.blocks_per_slot
    assert cache.map_slots([3, 1, 3]) is None
    assert [cache.is_slot_mapped(s) for s in range(4)] == [False, True, False, True]
    assert cache.stats().pages_held == 2 * cache.pages_per_growth
    assert cache.map_slots([1]) is None  # mapped already: nothing to do
    chosen = [3 * per_slot + 7, per_slot, 3 * per_slot]
    cache.take(chosen)
    host_view(cache, 1, "v")[chosen[0] * cache.block_bytes] = 9  # a chosen block is writable
    assert cache.get_num_used_blocks() == 3
    with pytest.raises(ValueError, match="is already in use"):
        cache.take([per_slot])
    with pytest.raises(ValueError, match="is not on a mapped slot"):
        cache.take([0])
    with pytest.raises(ValueError, match=r"slot 4 is out of range \(0\.\.3\)"):
        cache.map_slots([4])
    assert cache.shrink() == 0  # both slots hold a chosen block
    cache.free(chosen)
    assert cache.shrink() == 2 and cache.stats().pages_held == 0


def test_map_slots_short_of_budget_maps_the_lowest_slots_asked_for():
    with kvmem.local(device="host", budget="16MiB") as s:  # 8 pages: 2 slots of 4 ranges
        cache = s.kv_cache(**GEOMETRY, max_tokens=8 * 512 * 16, low_watermark=0, high_watermark=0, background=False)
        assert s.source.sure_pages() == 8
        assert cache.map_slots([6, 2, 5]) == Shortfall("budget", "the local budget of 8 pages")
        assert [s for s in range(8) if cache.is_slot_mapped(s)] == [2, 5]
        assert s.source.sure_pages() == 0


def test_the_read_only_view_says_which_slots_are_mapped_and_used():
    with kvmem.local(device="host", budget="24MiB") as s:  # 12 pages: 3 slots of 4 ranges
        cache = s.kv_cache(**GEOMETRY, max_tokens=8 * 512 * 16, low_watermark=0, high_watermark=0, background=False)
        per_slot = cache.blocks_per_slot
        assert (cache.sure_pages(), cache.sure_slots(), cache.num_mapped_slots()) == (12, 3, 0)
        assert cache.map_slots([4, 1]) is None
        cache.take([4 * per_slot + 9, per_slot + 3, 4 * per_slot + 2])
        assert (cache.sure_pages(), cache.sure_slots(), cache.num_mapped_slots()) == (4, 1, 2)
        assert [cache.is_slot_mapped(slot) for slot in range(6)] == [False, True, False, False, True, False]
        assert cache.slot_usage() == [(4, 2), (1, 1)]  # the fullest first
        assert cache.used_blocks(4) == [4 * per_slot + 2, 4 * per_slot + 9]
        assert cache.get_num_free_blocks() == 2 * per_slot - 3 and cache.get_num_used_blocks() == 3


def test_shrinking_waits_for_the_engine_lock_and_tells_the_engine_what_went_back(session):
    cache = session.kv_cache(**GEOMETRY, max_tokens=8 * 512 * 16, low_watermark=0, high_watermark=0)
    lock = threading.RLock()
    unmapped: list[list[int]] = []
    cache.attach_engine(lock, on_unmapped=unmapped.append)
    with lock:  # an engine between counting its free blocks and allocating them
        cache.map_slots([0, 2])  # the background thread sees 2 slots of free blocks past its high watermark
        time.sleep(0.3)
        assert cache.stats().mapped_slots == 2 and not unmapped
    wait_for(lambda: cache.stats().mapped_slots == 0, what="the background shrink after the lock is released")
    assert sorted(s for slots in unmapped for s in slots) == [0, 2]


class ListenedSource(LocalPageSource):
    """A local source that keeps the cache's listener, so that a test can speak as the daemon would."""

    listener: PageListener

    def listen(self, listener: PageListener) -> None:
        self.listener = listener


@pytest.mark.parametrize("kind", ["host", "cuda"])
def test_a_lowered_limit_takes_only_the_pages_over_its_target(kind: str):
    """A lowered limit comes as one message, POLICY, whose target says how many pages the cache may keep.
    The cache shrinks to the target and no further: once there, later passes of its background thread
    take nothing more, and the engine's cached blocks on the slot it keeps are not evicted.
    (The cache's listener is called here as the daemon's POLICY would call it.)"""
    device = open_device(kind)
    source = ListenedSource(device, budget_pages=64 * MiB // device.granularity)
    with Session(source) as session:
        check_the_lowered_limit(session, source)


def check_the_lowered_limit(session: Session, source: ListenedSource) -> None:
    cache = session.kv_cache(**GEOMETRY, max_tokens=8 * 512 * 16, low_watermark=0, high_watermark=0)
    per_slot, per_growth = cache.blocks_per_slot, cache.pages_per_growth
    assert cache.map_slots([0, 1, 2]) is None
    cached = {slot: [slot * per_slot] for slot in range(3)}
    cache.take([b for blocks in cached.values() for b in blocks])
    asked: list[int] = []

    def evict(slots: int) -> None:
        asked.append(slots)
        for slot in sorted(cached, reverse=True)[:slots]:
            cache.free(cached.pop(slot))

    cache.attach_engine(threading.RLock(), evictor=evict)
    source.listener.target(per_growth)  # POLICY: one slot's pages
    wait_for(lambda: cache.stats().mapped_slots == 1, what="the cache at its target")
    time.sleep(0.3)  # several passes of the background thread
    assert (cache.stats().mapped_slots, asked, list(cached)) == (1, [2], [0])


def test_the_evictor_frees_blocks_so_a_lowered_limit_is_met(daemon: DaemonProcess):
    with (
        kvmem.connect("evicting", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as c,
    ):
        cache = s.kv_cache(**GEOMETRY, max_tokens=8 * 512 * 16, low_watermark=0, high_watermark=0)
        per_slot = cache.blocks_per_slot
        assert cache.target_pages == -1
        assert s.source.sure_pages() == 0  # the daemon weighs each request when it comes
        cache.map_slots([0, 1, 2])
        cached = {slot: [slot * per_slot, slot * per_slot + 1] for slot in range(3)}  # an engine's cached blocks
        cache.take([b for blocks in cached.values() for b in blocks])
        asked: list[int] = []

        def evict(slots: int) -> None:  # drops its cached blocks on the highest slots first
            asked.append(slots)
            for slot in sorted(cached, reverse=True)[:slots]:
                cache.free(cached.pop(slot))

        cache.attach_engine(threading.RLock(), evictor=evict)
        c.set_limit("evicting", 4 * 2 * MiB)  # one slot's worth of pages
        wait_for(lambda: cache.target_pages == 4, what="the target to reach the cache")
        wait_for(lambda: cache.stats().mapped_slots == 1, what="the cache to settle at the limit")
        assert asked[0] == 2 and list(cached) == [0]
        daemon.wait_for_model("evicting", lambda m: m.mapped_pages == 4)
        cache.free(cached.pop(0))


def demand_cache(session: Session) -> ElasticKVCache:
    """One layer, 2 MiB pages: slots of 2 pages and 64 blocks; watermarks 32 (low) and 64 (high).
    No background thread: the test runs its passes (`keep_watermarks`) itself."""
    cache = session.kv_cache(
        num_layers=1, block_size=16, num_kv_heads=8, head_dim=128, max_tokens=64 * 16 * 32, background=False
    )
    assert (cache.blocks_per_slot, cache.low_watermark, cache.high_watermark) == (64, 32, 64)
    return cache


def test_growth_is_sized_from_the_demand_rate(clock: GrowthClock):
    from kvmem.cache.growth import DECAY_S

    with kvmem.local(device="host", budget="128MiB") as session:  # 64 pages: 32 slots
        cache = demand_cache(session)
        keep_watermarks = cache._growth.keep_watermarks  # one pass of the background thread
        keep_watermarks()  # nothing in use yet: up to the high watermark, one slot
        assert (cache.num_mapped_slots(), cache.stats().grows) == (1, 1)
        clock.now += 0.010
        first = cache.alloc(40)  # 24 free, below the low watermark, 10 ms after the last growth
        keep_watermarks()
        # 4000 blocks/s: a second of it is more than 16 slots; the growth maps 16 (MAX_BURST) at once.
        assert (cache.num_mapped_slots(), cache.stats().grows) == (17, 2)
        clock.now += 0.5
        keep_watermarks()
        assert cache.num_mapped_slots() == 17  # the raised watermark keeps them while demand may go on
        clock.now += DECAY_S
        keep_watermarks()
        # The raised watermark lapsed: back to the live blocks plus the high watermark (and less than a slot).
        assert (cache.num_mapped_slots(), cache.get_num_free_blocks()) == (2, 88)
        clock.now += 10.0
        lone = cache.alloc(70)  # one request after a quiet spell: 18 free
        keep_watermarks()
        assert (cache.num_mapped_slots(), cache.stats().grows) == (3, 3)  # what the watermark needs, no more
        clock.now += 0.25
        steady = cache.alloc(60)  # 240 blocks/s since that growth: 22 free
        keep_watermarks()
        # Up to 240 free blocks: (240 - 22) / 64 rounds up to 4 slots.
        assert (cache.num_mapped_slots(), cache.get_num_free_blocks()) == (7, 22 + 4 * 64)
        cache.free(first + lone + steady)


def test_a_burst_after_a_quiet_spell_is_measured_from_its_first_request(clock: GrowthClock):
    with kvmem.local(device="host", budget="128MiB") as session:  # 64 pages: 32 slots
        cache = demand_cache(session)
        keep_watermarks = cache._growth.keep_watermarks  # one pass of the background thread
        keep_watermarks()  # up to the high watermark: one slot, 64 free
        clock.now += 100.0  # a quiet spell
        first = cache.alloc(20)  # the burst's first request, served by mapped free blocks: 44 free
        clock.now += 0.010
        second = cache.alloc(20)  # 24 free, below the low watermark
        keep_watermarks()
        # 20 blocks in the 10 ms since the first request: 2000 blocks/s, a second of it more than 16
        # slots, so the growth maps 16 at once. Over the 100 s since the last growth (40 blocks), it
        # would have been one slot, and the burst's next requests would each have grown again.
        assert (cache.num_mapped_slots(), cache.stats().grows) == (17, 2)
        cache.free(first + second)


def test_an_alloc_that_must_grow_grows_by_what_it_lacks_and_is_not_counted_as_demand(clock: GrowthClock):
    with kvmem.local(device="host", budget="128MiB") as session:
        cache = demand_cache(session)
        big = cache.alloc(200)  # nothing mapped: it grows on demand, by the 4 slots it needs
        assert (cache.num_mapped_slots(), cache.get_num_free_blocks(), cache.stats().grows) == (4, 56, 1)
        clock.now += 1.0
        more = cache.alloc(30)  # 26 free: the background thread's pass grows
        cache._growth.keep_watermarks()
        # 30 blocks in the second since (the 200 were served by the growth they waited for): one slot,
        # where counting them would have made 230 blocks/s and 4 slots.
        assert (cache.num_mapped_slots(), cache.stats().grows) == (5, 2)
        cache.free(big + more)


class ReadySource(ListenedSource):
    """A local source that keeps `ready` pages made ahead, as a daemon keeps its warm reserve: what
    `acquire_ready` hands out (then made again one by one as `acquire` asks, like the plain source).
    The cache's listener is kept, to speak as the daemon would (`ListenedSource`)."""

    def __init__(self, device, budget_pages: int, ready: int):
        super().__init__(device, budget_pages)
        self.ready = ready
        self.asked: list[tuple[str, int]] = []  # ("ready" or "wait", pages), in order

    def acquire_ready(self, n: int):
        self.asked.append(("ready", n))
        grant = super().acquire(min(n, self.ready), 0.0)
        self.ready -= len(grant.pages)
        return grant

    def acquire(self, n: int, wait: float):
        self.asked.append(("wait", n))
        return super().acquire(n, wait)


def ready_cache(source: ReadySource) -> ElasticKVCache:
    """`demand_cache`'s geometry (slots of 2 pages and 64 blocks, watermarks 32 and 64) over `source`."""
    return ElasticKVCache(source, 1, 16, 8, 128, max_tokens=64 * 16 * 32, background=False)


def test_an_alloc_that_outruns_a_burst_maps_what_the_demand_uses_from_ready_pages_in_one_growth(clock: GrowthClock):
    source = ReadySource(open_device("host"), 64, ready=40)
    cache = ready_cache(source)
    try:
        clock.now += 0.010
        first = cache.alloc(40)  # nothing mapped, 10 ms after the cache was made: 4000 blocks/s
        # It lacks one slot; a second of its demand is more than 16 slots beyond the high watermark:
        # 1024 blocks, and its own 40: the 16 whole slots they fill (32 ready pages) in one growth,
        # asked for without a wait.
        assert source.asked == [("ready", 32)]
        assert (cache.num_mapped_slots(), cache.stats().grows, cache.get_num_free_blocks()) == (16, 1, 984)
        cache._growth.keep_watermarks()  # the raised watermark keeps the slots mapped ahead
        assert cache.num_mapped_slots() == 16
        clock.now += 0.001
        second = cache.alloc(900)  # 984 free: no growth, nothing asked
        assert (source.asked, cache.stats().grows) == ([("ready", 32)], 1)
        cache.free(first + second)
    finally:
        cache.close()


def test_slots_mapped_ahead_of_demand_stop_at_the_daemons_target(clock: GrowthClock):
    source = ReadySource(open_device("host"), 64, ready=40)
    cache = ready_cache(source)
    try:
        source.listener.target(10)  # POLICY: the model's limit, 10 pages (5 slots)
        clock.now += 0.010
        ids = cache.alloc(40)  # its demand fills 16 slots: it asks for the 5 its target allows
        assert source.asked == [("ready", 10)]
        assert (cache.num_mapped_slots(), cache.stats().grows) == (5, 1)
        cache.free(ids)
    finally:
        cache.close()


def test_ready_pages_short_of_what_an_alloc_lacks_are_kept_and_it_waits_only_for_the_rest(clock: GrowthClock):
    source = ReadySource(open_device("host"), 64, ready=3)
    cache = ready_cache(source)
    try:
        clock.now += 0.010
        ids = cache.alloc(100)  # lacks 2 slots (4 pages); 3 are ready, too few to map them
        # Its demand fills 17 slots (1024 + 100 blocks): asked for without a wait, 3 pages come.
        # They are kept, and it waits for the 1 page it still lacks, not for the 16 slots ahead:
        # one growth of 2 slots, 4 pages held in all.
        assert source.asked == [("ready", 34), ("wait", 1)]
        assert (cache.num_mapped_slots(), cache.stats().grows, cache.stats().pages_held) == (2, 1, 4)
        assert cache._growth.headroom() == cache.high_watermark  # nothing mapped ahead, nothing raised
        cache.free(ids)
    finally:
        cache.close()


def test_a_burst_of_allocs_grows_once_from_the_daemons_free_pages(clock: GrowthClock, tmp_path: Path):
    """A scheduler step's requests, allocated one after another, on a daemon whose reserve is warm:
    the first alloc that outruns the mapped blocks maps the step's slots in one growth, with the
    pages the daemon has free; the rest of what it asked for without a wait is denied, and that
    DENY is no denial in the daemon's counts (the engine asked for what was free, and got it)."""
    with DaemonProcess(tmp_path / "rt", "host", "128MiB", "--reserve", "20", "20") as daemon:
        wait_for(lambda: daemon.status().daemon.pages_free_clean >= 20, what="a warm reserve")
        with kvmem.connect("burst", runtime_dir=daemon.runtime_dir) as s:
            cache = demand_cache(s)
            clock.now += 0.010
            step = [cache.alloc(n) for n in (40, 30, 64, 64, 64, 64, 64, 64)]  # 458 blocks
            # The first asked for 16 slots (32 pages) without a wait and got the 20 free: 10 slots.
            assert (cache.num_mapped_slots(), cache.stats().grows) == (10, 1)
            shown = daemon.wait_for_model(
                "burst", lambda m: m.mapped_pages == 20, what="the growth in the daemon's view"
            )
            assert shown.model("burst").denies == 0 and shown.daemon.denies == 0
            for ids in step:
                cache.free(ids)


def test_a_demand_growth_the_budget_refuses_falls_back_to_what_is_needed(clock: GrowthClock):
    with kvmem.local(device="host", budget="8MiB") as session:  # 4 pages: 2 slots
        cache = demand_cache(session)
        cache._growth.keep_watermarks()
        assert cache.num_mapped_slots() == 1
        session.source.budget_pages = 2  # every page held: the next growth is refused outright
        clock.now += 0.001
        ids = cache.alloc(40)
        cache._growth.keep_watermarks()  # a burst of 16 slots asked for, refused: nothing raised
        assert (cache.num_mapped_slots(), cache._growth.headroom()) == (1, 64)
        cache.free(ids)


class StalledSource(LocalPageSource):
    """A local source whose `acquire` can be held up, as a daemon slow to answer would hold it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open = threading.Event()
        self.open.set()
        self.stalled = threading.Event()  # an acquire is waiting at the closed gate

    def acquire(self, n: int, wait: float):
        if not self.open.is_set():
            self.stalled.set()
            self.open.wait()
        return super().acquire(n, wait)


def test_an_alloc_that_finds_mapped_free_blocks_never_waits_for_a_growth_under_way():
    source = StalledSource(open_device("host"), 64)
    cache = ElasticKVCache(source, 1, 16, 8, 128, max_tokens=64 * 16 * 32)
    try:
        wait_for(lambda: cache.num_mapped_slots() == 1, what="the first growth")
        source.open.clear()
        first = cache.alloc(40)  # 24 free, below the low watermark: the background thread grows...
        wait_for(source.stalled.is_set, what="the background growth to wait for its pages")
        got: list[list[int]] = []
        alloc = threading.Thread(target=lambda: got.append(cache.alloc(24)))  # ...while this finds 24 free
        alloc.start()
        alloc.join(timeout=30)  # a hang, not a time limit: it must return with the growth still stalled
        assert not alloc.is_alive() and len(got[0]) == 24 and not source.open.is_set()
        source.open.set()
        wait_for(lambda: cache.num_mapped_slots() > 1, what="the growth, once its pages come")
        cache.free(first + got[0])
    finally:
        source.open.set()
        cache.close()


def test_a_short_grant_is_kept_and_topped_up_not_returned():
    # A budget of 3 pages and slots of 2 pages: the second growth gets 1 page; it is kept, not returned.
    source = LocalPageSource(open_device("host"), 3)
    cache = ElasticKVCache(source, 1, 16, 8, 128, max_tokens=64 * 16 * 4, background=False, grow_wait=0)
    try:
        assert cache.pages_per_growth == 2
        cache.alloc(64)
        with pytest.raises(KVCacheFull):
            cache.alloc(64)
        assert len(cache._state.spare) == 1 and source.sure_pages() == 0
        cache.shrink()  # shrinking gives the spare page back
        assert cache._state.spare == [] and source.sure_pages() == 1
    finally:
        cache.close()
