"""The scheduler's cache over worker processes' caches (`RankedCache`), with the ranks in this process.

vLLM's multiprocess executor carries `RankedCache`'s commands to each worker's `RankFollower`
(`collective_rpc("kvmem_rank", ...)`); test_vllm_serve.py runs that for real. Here an executor of
the same shape calls real followers over real caches, each rank with its own session of a real
daemon, so that what the scheduler maps ahead of demand, and when it gives it back, is exact.
"""

from __future__ import annotations

from pathlib import Path

import kvmem
from kvmem.integrations.vllm.rank import RankFollower
from kvmem.integrations.vllm.ranked_cache import RankedCache
from tests.daemon_support import DaemonProcess, wait_for
from tests.support import GrowthClock

BLOCKS_PER_SLOT = 16  # one layer of 128 KiB blocks: a 2 MiB page for its K and one for its V


class InProcessExecutor:
    """`collective_rpc` as vLLM's executor answers it for `kvmem_rank`: each rank's reply, in order."""

    def __init__(self, followers: list[RankFollower]):
        self.followers = followers

    def collective_rpc(self, method: str, args: tuple, timeout: float | None = None) -> list:
        assert method == "kvmem_rank"
        op, *rest = args
        return [getattr(follower, op)(*rest) for follower in self.followers]


def test_slots_mapped_ahead_of_demand_on_every_rank_stay_until_the_raise_lapses(tmp_path: Path, clock: GrowthClock):
    from kvmem.cache.growth import DECAY_S

    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "32MiB", "--reserve", "16", "16") as daemon,  # 4 slots of 2 pages a rank
        kvmem.connect("tp.rank0", runtime_dir=runtime) as s0,
        kvmem.connect("tp.rank1", runtime_dir=runtime) as s1,
    ):
        wait_for(lambda: daemon.status().daemon.pages_free_clean >= 16, what="every page made and free")
        geometry = {"num_layers": 1, "block_size": 1, "num_kv_heads": 1, "head_dim": 1 << 17, "dtype": "int8"}
        watermarks = {"low_watermark": 0, "high_watermark": BLOCKS_PER_SLOT}
        caches = [s.kv_cache(**geometry, max_tokens=64, **watermarks) for s in (s0, s1)]
        ranked = RankedCache(InProcessExecutor([RankFollower(c, rank) for rank, c in enumerate(caches)]), 64)
        try:
            assert ranked.map_slots([0]) is None
            ranked.take(list(range(16)))  # slot 0 full, at once: a burst
            # A second of the demand is beyond the ceiling: 16 slots past the one-slot watermark.
            assert ranked.demand_blocks(pending=10) == 16 * BLOCKS_PER_SLOT
            assert ranked.map_slots([1], wait=1.0, ahead=[2, 3]) is None
            # Slot 1 and, from the ranks' free pages, 2 and 3: one growth on each rank.
            assert ranked.num_mapped_slots() == 4
            assert [(c.num_mapped_slots(), c.stats().grows) for c in caches] == [(4, 2), (4, 2)]
            ranked.free(list(range(16)))
            ranked.maintain()  # 64 free blocks, 3 slots beyond one slot's: kept while the demand's raise holds
            assert ranked.num_mapped_slots() == 4
            clock.now += DECAY_S + 0.1
            ranked.maintain()  # lapsed: every empty slot beyond one slot of free blocks goes back
            assert ranked.num_mapped_slots() == 1
            assert [c.num_mapped_slots() for c in caches] == [1, 1]
        finally:
            ranked.close()
