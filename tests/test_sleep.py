"""Sleep and wake through a real daemon: discard, offload to the host tier and restore, contention."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kvmem
from kvmem import KVCacheFull
from kvmem.cache import ElasticKVCache
from kvmem.cli.context import EXIT_TIMEOUT
from kvmem.cli.main import main as kvctl
from kvmem.common.errors import ControlError
from kvmem.control import ControlClient
from tests import fakecuda
from tests.daemon_support import DaemonProcess, EngineProcess, cleanup_shm, wait_for
from tests.support import REAL_CUDA

MiB = 1 << 20
GEOMETRY = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 64}  # 4 KiB blocks, 512 a page
# 2,560-byte blocks: 5-page slots, so restored pages must land on the right page of each slot.
ODD_GEOMETRY = {"num_layers": 1, "block_size": 16, "num_kv_heads": 1, "head_dim": 80}


@pytest.fixture(params=["host", "cuda"])  # "cuda": the fake driver, or the real one (tests/test_gpu_paths.py)
def daemon(request: pytest.FixtureRequest, tmp_path: Path):
    with DaemonProcess(tmp_path / "rt", request.param, "64MiB", "--reserve", "0", "0") as d:
        yield d


def fill_random(cache: ElasticKVCache, blocks: list[int], seed: int) -> None:
    """Random bytes into `blocks` of every range, through the device (so also on a real GPU)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in range(cache.num_layers):
        for kind in ("k", "v"):
            for block in blocks:
                data = torch.randint(0, 256, (cache.block_bytes,), dtype=torch.uint8, generator=generator)
                cache.device.copy_host_to_device(cache.block_address(layer, kind, block), data.numpy().tobytes())


def checksums(cache: ElasticKVCache, blocks: list[int]) -> dict[tuple[int, str, int], str]:
    out = {}
    for layer in range(cache.num_layers):
        for kind in ("k", "v"):
            for block in blocks:
                data = cache.device.read(cache.block_address(layer, kind, block), cache.block_bytes)
                out[layer, kind, block] = hashlib.sha256(data).hexdigest()
    return out


def model_state(daemon: DaemonProcess, name: str) -> str:
    model = daemon.status().model(name)
    return model.state.name if model else "GONE"


@pytest.mark.parametrize("geometry", [GEOMETRY, ODD_GEOMETRY], ids=["one-page-slots", "five-page-slots"])
def test_offload_sleep_and_wake_restore_every_block_bit_identical(daemon: DaemonProcess, geometry: dict):
    events: list[tuple[str, bool]] = []
    with (
        kvmem.connect("sleeper", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        s.on_sleep(lambda offload: events.append(("sleep", offload)))
        s.on_wake(lambda restored: events.append(("wake", restored)))
        cache = s.kv_cache(**geometry, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        per_slot = cache.blocks_per_slot
        ids = cache.alloc(3 * per_slot)  # slots 0, 1, 2
        cache.free(ids[per_slot : 2 * per_slot])  # slot 1 empties: it goes back, it is not saved
        cache.free(ids[2 * per_slot + 5 : 2 * per_slot + 9])  # a hole in slot 2 stays free after wake
        live = ids[:per_slot] + ids[2 * per_slot : 2 * per_slot + 5] + ids[2 * per_slot + 9 :]
        fill_random(cache, live, seed=1)
        before = checksums(cache, live)
        daemon.wait_for_model("sleeper", lambda m: m.used_pages == 2 * cache.pages_per_growth)

        assert control.sleep("sleeper", offload=True)["state"] == "draining"
        wait_for(lambda: model_state(daemon, "sleeper") == "ASLEEP", what="asleep")
        status = daemon.status()
        model = status.model("sleeper")
        assert (model.mapped_pages, model.saved_pages) == (0, 2 * cache.pages_per_growth)
        assert status.daemon.pages_granted == 0
        assert status.daemon.host_tier_used_bytes == 2 * cache.pages_per_growth * cache.page_size
        assert events == [("sleep", True)]
        assert cache.asleep and cache.stats().mapped_slots == 0
        with pytest.raises(KVCacheFull) as info:
            cache.alloc(1)
        assert info.value.reason == "asleep"

        assert control.wake("sleeper")["state"] == "waking"
        wait_for(lambda: len(events) == 2, what="the wake hook")  # it runs just after the cache wakes
        assert events == [("sleep", True), ("wake", True)] and not cache.asleep
        assert checksums(cache, live) == before
        # The status is published within a few ms of the daemon's AWAKE, maybe after the cache woke.
        status = daemon.wait_for_model("sleeper", lambda m: m.state.name == "AWAKE")
        assert status.model("sleeper").saved_pages == 0 and status.daemon.host_tier_used_bytes == 0
        assert status.model("sleeper").mapped_pages == 2 * cache.pages_per_growth
        # The allocator's state survived: the hole in slot 2 is handed out first, the ids stay valid.
        assert sorted(cache.alloc(4)) == ids[2 * per_slot + 5 : 2 * per_slot + 9]
        cache.free(live)
        fill_random(cache, cache.alloc(per_slot), seed=2)  # the restored mappings are writable


def test_discarding_sleep_runs_the_drain_hook_and_wake_serves_again(daemon: DaemonProcess):
    with (
        kvmem.connect("drainer", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        held = [cache.alloc(700)]
        woken = []

        @s.on_sleep
        def drain(offload: bool) -> None:
            assert offload is False
            cache.free(held.pop())  # the engine preempts its requests: every block is freed

        s.on_wake(woken.append)
        control.sleep("drainer")
        wait_for(lambda: model_state(daemon, "drainer") == "ASLEEP", what="asleep")
        assert daemon.status().model("drainer").mapped_pages == 0 and daemon.status().daemon.pages_granted == 0
        assert daemon.status().model("drainer").saved_pages == 0
        assert control.wake("drainer")["state"] == "awake"
        wait_for(lambda: woken == [True], what="the wake hook")
        cache.free(cache.alloc(600))


def test_sleeping_under_contention_hands_the_memory_over_and_wake_waits_for_it(daemon: DaemonProcess):
    page_budget = daemon.status().daemon.budget_pages  # 32 pages of 2 MiB
    with (
        kvmem.connect("big", runtime_dir=daemon.runtime_dir) as big_session,
        kvmem.connect("other", runtime_dir=daemon.runtime_dir) as other_session,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        big_session.on_sleep(lambda offload: None)  # a drain hook: this test's engine runs no work of its own
        # Big's first 24 pages are made on the grant path (no reserve): under load they can take more
        # than the other model's short wait, which only its refused alloc needs.
        big = big_session.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0, grow_wait=30)
        other = other_session.kv_cache(
            **GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0, grow_wait=0.2
        )
        blocks = big.alloc(6 * 512)  # 6 slots x 4 ranges = 24 pages: the engine uses them all
        fill_random(big, blocks, seed=3)
        before = checksums(big, blocks)
        with pytest.raises(KVCacheFull):
            other.alloc(3 * 512)  # 12 more pages do not fit in 32
        control.sleep("big", offload=True)
        wait_for(lambda: model_state(daemon, "big") == "ASLEEP", what="asleep")
        mine = other.alloc(3 * 512)  # now they do: the sleeper's memory went to the other model
        daemon.wait_for_model("other", lambda m: m.mapped_pages == 12, what="the other model's pages")

        assert control.wake("big")["state"] == "waking"  # 24 pages needed, 20 free: it must wait

        def big_status() -> dict:
            return next(m for m in control.status()["models"] if m["model"] == "big")

        waiting = wait_for(lambda: "more pages" in (m := big_status())["waiting_for"] and m, what="a reason to wait")
        assert waiting["state"] == "waking" and "32 of 32 pages exist" in waiting["waiting_for"], waiting
        # One snapshot: shared memory shows the same reason, and `kvctl wake --wait` reports it from there.
        assert "32 of 32 pages exist" in daemon.status().model("big").waiting_for
        result = CliRunner().invoke(
            kvctl, ["--runtime-dir", str(daemon.runtime_dir), "wake", "big", "--wait", "--timeout", "0.2"]
        )
        assert result.exit_code == EXIT_TIMEOUT, result.output
        assert "big: waking, waiting for " in result.stderr and "32 of 32 pages exist" in result.stderr
        assert big.asleep
        other.free(mine)  # the other model's pages become idle: reclaimed for the wake
        wait_for(lambda: not big.asleep, timeout=15, what="the wake to complete")
        assert checksums(big, blocks) == before
        assert daemon.status().daemon.pages_granted <= page_budget


def test_a_limit_lowered_during_a_wake_holds_the_restore_until_it_is_raised(tmp_path: Path):
    """The operator lowers a waking model's limit under what it saved, once part of its cache came back:
    the rest waits for the limit to rise (status says so) and the wake then completes, bit-identical.
    Before, that restore was denied: the model stayed waking for good and its engine asleep."""
    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "48MiB", "--reserve", "0", "0") as daemon,  # 24 pages
        kvmem.connect("big", runtime_dir=runtime) as s,
        ControlClient(runtime_dir=runtime) as control,
    ):
        s.on_sleep(lambda offload: None)  # a drain hook: this test's engine runs no work of its own
        big = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        blocks = big.alloc(4 * 512)  # 4 slots x 4 ranges = 16 pages
        fill_random(big, blocks, seed=5)
        before = checksums(big, blocks)
        control.sleep("big", offload=True)
        wait_for(lambda: model_state(daemon, "big") == "ASLEEP", what="asleep")
        with EngineProcess(runtime, "other") as other:  # holds what it gets: it ignores RECLAIM
            assert other.call("grow", 16)["granted"] == 16
            assert control.wake("big")["state"] == "waking"  # 16 pages to restore, 8 free
            daemon.wait_for_model("big", lambda m: m.mapped_pages == 8, what="the free pages restored")
            control.set_limit("big", 10 * 2 * MiB)  # 10 pages: under the 16 it saved
            other.call("return", "all")  # pages enough, but only 2 more within the limit
            daemon.wait_for_model(
                "big",
                lambda m: (
                    m.mapped_pages == 10 and "6 pages to restore: the limit of 10 pages leaves no room" in m.waiting_for
                ),
                what="the restore held by the limit",
            )
            assert big.asleep and model_state(daemon, "big") == "WAKING"
            control.set_limit("big", None)
            wait_for(lambda: not big.asleep, timeout=15, what="the wake to complete")
        assert checksums(big, blocks) == before
        assert model_state(daemon, "big") == "AWAKE"


def test_a_daemon_that_dies_during_a_wake_leaves_the_engine_asleep_until_kvctl_wake(tmp_path: Path):
    """kvmemd is killed while a wake restores an offloaded cache (half of it back, the rest waiting
    for memory another engine holds). The engine reconnects asleep with the restored pages, which the
    new daemon adopts; `kvctl wake` wakes it with nothing restored (the rest of the cache went with
    the old daemon's host tier): the half-restored pages go back and the cache grows anew."""
    runtime = tmp_path / "rt"
    events: list[tuple[str, bool]] = []
    daemon = DaemonProcess(runtime, "host", "48MiB", "--reserve", "0", "0")  # 24 pages
    try:
        with kvmem.connect("big", runtime_dir=runtime) as s, EngineProcess(runtime, "other") as other:
            s.on_sleep(lambda offload: events.append(("sleep", offload)))
            s.on_wake(lambda restored: events.append(("wake", restored)))
            big = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
            fill_random(big, big.alloc(4 * 512), seed=6)  # 16 pages
            with ControlClient(runtime_dir=runtime) as control:
                control.sleep("big", offload=True)
                wait_for(lambda: model_state(daemon, "big") == "ASLEEP", what="asleep")
                assert other.call("grow", 16)["granted"] == 16
                assert control.wake("big")["state"] == "waking"  # 8 pages free of the 16 to restore
            daemon.wait_for_model("big", lambda m: m.mapped_pages == 8, what="half of the cache restored")

            daemon.kill()
            daemon.start()
            daemon.wait_for_model(
                "big", lambda m: m.mapped_pages == 8, timeout=30, what="the engine to re-register its restored pages"
            )
            assert model_state(daemon, "big") == "ASLEEP" and big.asleep
            with ControlClient(runtime_dir=runtime) as control:
                assert control.wake("big")["state"] == "awake"
            wait_for(lambda: len(events) == 2, what="the wake hook")
            assert events == [("sleep", True), ("wake", False)] and not big.asleep
            assert big.get_num_used_blocks() == 0 and big.stats().mapped_slots == 0
            daemon.wait_for_model("big", lambda m: m.mapped_pages == 0, what="the half-restored pages back")
            other.call("return", "all")
            fill_random(big, big.alloc(big.blocks_per_slot), seed=7)  # the cache grows again
            daemon.wait_for_model("big", lambda m: m.mapped_pages == big.pages_per_growth, what="a new slot")
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
        cleanup_shm(daemon.paths.shm_name)  # what a killed daemon left, if the test failed before stop()


def test_an_offload_the_host_tier_cannot_hold_is_refused(tmp_path: Path):
    with (
        DaemonProcess(tmp_path / "rt", "host", "64MiB", "--host-tier", "4MiB") as daemon,
        kvmem.connect("huge", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        s.on_sleep(lambda offload: None)  # a drain hook: this test's engine runs no work of its own
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        cache.alloc(512)  # 4 pages = 8 MiB
        with pytest.raises(ControlError, match="the host tier has room for 2 pages, model 'huge' holds 4"):
            control.sleep("huge", offload=True)
        wait_for(lambda: model_state(daemon, "huge") == "AWAKE", what="the model in the status")
        assert not cache.asleep


def test_an_engine_that_exits_asleep_frees_its_saved_cache(daemon: DaemonProcess):
    with ControlClient(runtime_dir=daemon.runtime_dir) as control:
        with kvmem.connect("leaver", runtime_dir=daemon.runtime_dir) as s:
            s.on_sleep(lambda offload: None)  # a drain hook: this test's engine runs no work of its own
            cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
            cache.alloc(512)
            control.sleep("leaver", offload=True)
            wait_for(lambda: model_state(daemon, "leaver") == "ASLEEP", what="asleep")
            assert daemon.status().daemon.host_tier_used_bytes == 4 * 2 * MiB
        wait_for(lambda: daemon.status().daemon.host_tier_used_bytes == 0, what="the tier to be freed")
        with pytest.raises(ControlError, match=r"is still saving|no engine attached"):
            control.sleep("leaver", offload=True)


def test_an_engine_asleep_across_a_daemon_restart_stays_asleep_until_kvctl_wake(daemon: DaemonProcess):
    """The daemon restarts (`systemctl restart`) while an engine sleeps offloaded: its saved cache went
    with the old daemon, but the engine reconnects saying it sleeps, so the new daemon shows it asleep,
    `kvctl wake` reaches it, and the wake says nothing was restored (the engine drops its block ids)."""
    events: list[tuple[str, bool]] = []
    with kvmem.connect("restarted", runtime_dir=daemon.runtime_dir) as s:
        s.on_sleep(lambda offload: events.append(("sleep", offload)))
        s.on_wake(lambda restored: events.append(("wake", restored)))
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        fill_random(cache, cache.alloc(2 * cache.blocks_per_slot), seed=1)
        with ControlClient(runtime_dir=daemon.runtime_dir) as control:
            control.sleep("restarted", offload=True)
        wait_for(lambda: model_state(daemon, "restarted") == "ASLEEP", what="asleep")

        daemon.stop()
        daemon.start()
        wait_for(lambda: model_state(daemon, "restarted") != "GONE", what="the engine to re-register")
        model = daemon.status().model("restarted")
        assert (model.state.name, model.mapped_pages, model.saved_pages) == ("ASLEEP", 0, 0)
        assert cache.asleep and events == [("sleep", True)]
        with ControlClient(runtime_dir=daemon.runtime_dir) as control:
            assert control.wake("restarted")["state"] == "awake"
        wait_for(lambda: len(events) == 2, what="the wake hook")
        assert events == [("sleep", True), ("wake", False)] and not cache.asleep
        assert cache.get_num_used_blocks() == 0  # nothing came back: every block was freed
        fill_random(cache, cache.alloc(cache.blocks_per_slot), seed=2)  # and the cache grows again
        daemon.wait_for_model("restarted", lambda m: m.mapped_pages == cache.pages_per_growth)


def test_an_engine_whose_daemon_dies_during_its_drain_finishes_the_sleep_on_the_new_daemon(daemon: DaemonProcess):
    """kvmemd is killed while an engine drains for `kvctl sleep --offload` (its hook still running). The
    engine reconnects saying it sleeps, so the new daemon shows it asleep; it finishes its drain there
    on the same connection (its pages come back as returns: nothing can be saved for a sleep that
    daemon never ordered), and `kvctl wake` wakes it with nothing restored. Before, it finished with
    OFFLOADs the new daemon took for a protocol error while it called the model awake: the engine,
    its admission stopped by the drain, was never woken again."""
    events: list[tuple[str, bool]] = []
    draining, finish = threading.Event(), threading.Event()

    def drain(offload: bool) -> None:
        events.append(("sleep", offload))
        draining.set()
        finish.wait(timeout=60)  # the engine is still finishing its requests when the daemon dies

    with kvmem.connect("interrupted", runtime_dir=daemon.runtime_dir) as s:
        s.on_sleep(drain)
        s.on_wake(lambda restored: events.append(("wake", restored)))
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        fill_random(cache, cache.alloc(2 * cache.blocks_per_slot), seed=1)
        pages = 2 * cache.pages_per_growth
        with ControlClient(runtime_dir=daemon.runtime_dir) as control:
            control.sleep("interrupted", offload=True)
        assert draining.wait(timeout=30), "the drain hook did not run"
        daemon.kill()
        daemon.start()
        status = daemon.wait_for_model(
            "interrupted", lambda m: m.mapped_pages == pages, timeout=30, what="the engine to re-register its pages"
        )
        client_id = status.model("interrupted").client_id
        assert status.model("interrupted").state.name == "ASLEEP"
        finish.set()
        daemon.wait_for_model("interrupted", lambda m: m.mapped_pages == 0, what="the drained pages back")
        wait_for(lambda: cache.stats().mapped_slots == 0, what="the cache to finish its drain")
        model = daemon.status().model("interrupted")
        assert (model.state.name, model.client_id, model.saved_pages) == ("ASLEEP", client_id, 0)
        assert "not draining" not in daemon.log()  # no OFFLOAD refused: the connection lived on
        with ControlClient(runtime_dir=daemon.runtime_dir) as control:
            assert control.wake("interrupted")["state"] == "awake"
        wait_for(lambda: len(events) == 2, what="the wake hook")
        assert events == [("sleep", True), ("wake", False)] and not cache.asleep
        assert cache.get_num_used_blocks() == 0  # what it had saved went with the old daemon
        fill_random(cache, cache.alloc(cache.blocks_per_slot), seed=2)  # and the cache grows again
        daemon.wait_for_model("interrupted", lambda m: m.mapped_pages == cache.pages_per_growth)


# Pipelined sleep and wake (kvmem.cache.sleep hands the daemon 32 pages at a time as it unmaps them;
# kvmemd copies 16-page batches on two threads and sends each restored batch at once). 12 slots of
# 4 pages: 48 pages, two OFFLOADs (32 + 16) and three copy batches each way.
PIPELINE_SLOTS = 12


def fill_slots(cache: ElasticKVCache, slots: int) -> list[int]:
    """Allocate `slots` full slots; random bytes into 8 blocks of each (so into every page); those blocks."""
    ids = cache.alloc(slots * cache.blocks_per_slot)
    filled = ids[:: cache.blocks_per_slot // 8]
    fill_random(cache, filled, seed=3)
    return filled


def pipeline_daemon(tmp_path: Path, kind: str, reserve: int = 0, **faults: str) -> DaemonProcess:
    """A daemon for the pipelined sleeps, its reserve `reserve` pages; `faults` are the fake driver's
    to inject (tests/fakecuda): FAKECUDA_FAIL_COPY_AT, FAKECUDA_PINNED_LIMIT_BYTES or
    FAKECUDA_HOST_ALLOC_GATE."""
    runtime = tmp_path / "rt"
    env = None
    if faults:
        counters = runtime.parent / f"{runtime.name}.fakecuda-counters"
        env = fakecuda.child_env(FAKECUDA_COUNTERS_FILE=str(counters), **faults)
    return DaemonProcess(runtime, kind, "128MiB", "--reserve", str(reserve), str(reserve), env=env)


def offload_a_filled_cache(
    daemon: DaemonProcess, session: kvmem.Session, control: ControlClient, model: str
) -> tuple[ElasticKVCache, list[bool]]:
    """`model`'s cache with `PIPELINE_SLOTS` filled slots, slept with --offload until ASLEEP; and the
    list its wake hook appends `restored` to."""
    woke: list[bool] = []
    session.on_sleep(lambda offload: None)  # a drain hook: this test's engine runs no work of its own
    session.on_wake(woke.append)
    cache = session.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
    fill_slots(cache, PIPELINE_SLOTS)
    daemon.wait_for_model(model, lambda m: m.used_pages == PIPELINE_SLOTS * cache.pages_per_growth)
    control.sleep(model, offload=True)
    wait_for(lambda: model_state(daemon, model) == "ASLEEP", what="asleep")
    return cache, woke


def woken_empty_and_usable(control: ControlClient, model: str, cache: ElasticKVCache, woke: list[bool]) -> None:
    """Wake `model` after its offload was lost: the cache comes back empty, says so, and works."""
    control.wake(model)
    wait_for(lambda: woke, what="the wake to reach the engine")
    assert woke == [False] and not cache.asleep
    assert cache.stats().mapped_slots == 0  # the partial cache was dropped, not trusted
    again = cache.alloc(2 * cache.blocks_per_slot)  # usable again, on fresh or recycled pages
    fill_random(cache, again, seed=4)
    cache.free(again)


@pytest.mark.parametrize("kind", ["host", "cuda"])
def test_a_pipelined_offload_and_wake_of_many_pages_is_bit_identical(tmp_path: Path, kind: str):
    with (
        pipeline_daemon(tmp_path, kind) as daemon,
        kvmem.connect("many", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        woke: list[bool] = []
        s.on_sleep(lambda offload: None)  # a drain hook: this test's engine runs no work of its own
        s.on_wake(woke.append)
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        assert cache.pages_per_growth == 4
        ids = fill_slots(cache, PIPELINE_SLOTS)
        before = checksums(cache, ids)
        pages = PIPELINE_SLOTS * cache.pages_per_growth
        daemon.wait_for_model("many", lambda m: m.used_pages == pages)
        for cycle in range(2):  # the second sleep reuses the tier memory the first wake freed
            control.sleep("many", offload=True)
            wait_for(lambda: model_state(daemon, "many") == "ASLEEP", what="asleep")
            status = daemon.status()
            assert status.model("many").saved_pages == pages and status.daemon.pages_granted == 0
            control.wake("many")
            # The wake hooks run just after the cache stops being asleep: wait for them, not for that.
            wait_for(lambda n=cycle + 1: len(woke) == n, what="the wake hook")
            assert woke == [True] * (cycle + 1) and not cache.asleep
            assert checksums(cache, ids) == before
            status = daemon.wait_for_model("many", lambda m: m.state.name == "AWAKE")
            assert status.daemon.host_tier_used_bytes == 0 and status.model("many").mapped_pages == pages
        if kind == "cuda" and not REAL_CUDA:  # every page copied once each way per cycle, never more
            counters = daemon.counters()
            assert (counters["cuMemcpyDtoH"], counters["cuMemcpyHtoD"]) == (2 * pages, 2 * pages)


@pytest.mark.skipif(REAL_CUDA, reason="injects a copy failure into the fake driver")
@pytest.mark.parametrize("where", ["sleep", "wake"])
def test_a_copy_failing_half_way_through_a_pipelined_sleep_or_wake_loses_no_page(tmp_path: Path, where: str):
    """The daemon's 20th copy fails: during the sleep (a save batch), or during the wake (a
    restore batch). The cache comes back empty and says so (restored False), and every page is
    accounted for: none held by the daemon's copies, none left in the tier, none lost."""
    pages = PIPELINE_SLOTS * 4
    fail_at = 20 if where == "sleep" else pages + 20
    with (
        pipeline_daemon(tmp_path, "cuda", FAKECUDA_FAIL_COPY_AT=str(fail_at)) as daemon,
        kvmem.connect("broken", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        cache, woke = offload_a_filled_cache(daemon, s, control, "broken")
        status = daemon.status()
        # A failed save batch keeps nothing: its 16 pages' bytes are lost, its pages are back in the pool.
        assert status.model("broken").saved_pages == (pages - 16 if where == "sleep" else pages)
        assert status.daemon.pages_granted == 0 and status.daemon.pages_free == status.daemon.pages_created
        woken_empty_and_usable(control, "broken", cache, woke)
        daemon.wait_for_model("broken", lambda m: m.state.name == "AWAKE")
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="the restored pages to come back")
        status = daemon.status()
        assert status.model("broken").saved_pages == 0 and status.daemon.host_tier_used_bytes == 0
        assert status.daemon.pages_free == status.daemon.pages_created


@pytest.mark.skipif(REAL_CUDA, reason="holds the fake driver's cuMemHostAlloc")
def test_other_engines_are_granted_pages_while_a_first_offload_pins_its_tier(tmp_path: Path):
    """A first offloading sleep makes its tier's chunks (cuMemHostAlloc, which pins: slow on a GPU).
    The fake driver holds every cuMemHostAlloc at a gate: meanwhile the sleep stays under way, and
    another engine's growth is granted pages at once. Neither the event loop (which serves the
    GROW) nor the device lock (which the pool's worker and a page's first export need) waits for
    the pinning. Then the gate opens and the sleep and wake complete bit-identical."""
    gate = tmp_path / "pinning-may-go-on"
    with (
        pipeline_daemon(tmp_path, "cuda", reserve=8, FAKECUDA_HOST_ALLOC_GATE=str(gate)) as daemon,
        kvmem.connect("sleeper", runtime_dir=daemon.runtime_dir) as sleeper,
        kvmem.connect("busy", runtime_dir=daemon.runtime_dir) as busy,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        try:
            woke: list[bool] = []
            sleeper.on_sleep(lambda offload: None)  # a drain hook: this engine runs no work of its own
            sleeper.on_wake(woke.append)
            cache = sleeper.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
            ids = fill_slots(cache, PIPELINE_SLOTS)
            before = checksums(cache, ids)
            daemon.wait_for_model("sleeper", lambda m: m.used_pages == PIPELINE_SLOTS * cache.pages_per_growth)
            control.sleep("sleeper", offload=True)
            wait_for(lambda: daemon.counters()["cuMemHostAlloc"] > 0, what="a copy worker to be pinning")
            other = busy.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
            blocks = other.alloc(2 * other.blocks_per_slot)
            assert model_state(daemon, "sleeper") == "DRAINING"  # still held at the gate
            other.free(blocks)
        finally:
            gate.touch()
        wait_for(lambda: model_state(daemon, "sleeper") == "ASLEEP", what="asleep")
        control.wake("sleeper")
        wait_for(lambda: woke, what="the wake hook")
        assert woke == [True] and checksums(cache, ids) == before


@pytest.mark.skipif(REAL_CUDA, reason="limits the fake driver's page-locked memory")
def test_a_host_that_cannot_pin_the_tier_loses_the_offload_and_no_page(tmp_path: Path):
    """The fake driver pins one page of host memory and no more: the tier's first chunk is made and
    every later cuMemHostAlloc fails, so every save batch fails. The sleep still ends, the cache
    comes back empty and says so, no page or tier byte stays counted, and the one chunk made is
    kept warm, not leaked."""
    with (
        pipeline_daemon(tmp_path, "cuda", FAKECUDA_PINNED_LIMIT_BYTES=str(2 << 20)) as daemon,
        kvmem.connect("unpinned", runtime_dir=daemon.runtime_dir) as s,
        ControlClient(runtime_dir=daemon.runtime_dir) as control,
    ):
        cache, woke = offload_a_filled_cache(daemon, s, control, "unpinned")
        status = daemon.status()
        assert status.model("unpinned").saved_pages == 0 and status.daemon.host_tier_used_bytes == 0
        assert status.daemon.pages_granted == 0 and status.daemon.pages_free == status.daemon.pages_created
        counters = daemon.counters()
        assert counters["live.host_allocations"] == 1 and counters["cuMemcpyDtoH"] == 0  # no batch had its chunks
        woken_empty_and_usable(control, "unpinned", cache, woke)
