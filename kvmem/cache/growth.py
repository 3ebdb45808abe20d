"""Growth and shrink of an elastic KV cache: watermarks, the daemon's target and reclaims.

Growth maps whole slots with pages from the source: ahead of demand on the background thread
(keeping the mapped free blocks between the low and the high watermark), on demand in `alloc`
when the free blocks run out, or exactly the slots an engine that picks its own blocks asks for.

Shrink gives whole empty slots back: beyond the high watermark by a slot or more, when the daemon
reclaims pages, and down to the daemon's target (0 while asleep). A slot with a live block is
never unmapped; when the daemon wants more slots than are empty, the engine's evictor is asked to
drop blocks first.

Growth sized from demand. Each growth costs one set-access call per K and V range whatever the
number of slots it maps (a run of slots is contiguous in every range), so a growth should cover
the demand to come, not one slot at a time. The demand rate is measured, not guessed from the
time between growths: the blocks taken since the previous growth was decided (those taken while
it waited for its pages included), net of frees, over the time since then (`DemandMeter.rate`),
or, if higher, the blocks taken after the first request since then over the time since that
request (the block allocator times it: `arm_first_take`): a burst that begins after a quiet
spell, its first requests served by mapped free blocks, is measured from its beginning, not
diluted by the quiet spell before it. A growth brings the mapped free blocks up to what that rate
uses in `HORIZON_S` (at least the high watermark, at most `MAX_BURST - 1` slots beyond it), so an
engine that fills a slot within milliseconds of its last growth grows by many slots at once, while
one request after a quiet spell (the same blocks over a long time) grows by what it needs.
The high watermark stays raised by that much (`headroom`) while growths keep coming; `DECAY_S`
after the last one it falls back to the configured one, and the empty slots beyond it are shrunk
as before. (A single alloc is one event, not a rate: the first growth after a quiet spell is
sized from the quiet spell too, and the next one, right behind it, from the burst.)

Who waits. An alloc that finds mapped free blocks is one call into the block allocator, whose
own mutex no thread holds across a request to the daemon or a driver call: the background thread
holds the grow lock while it waits for pages. An alloc that finds too few free blocks grows on
demand, after any growth already under way, and waits only for the pages it needs; but it maps
with them, in the same growth, the slots its demand uses (this alloc counted) if the page source
has their pages ready (`PageSource.acquire_ready`: the daemon's free pages, asked for without a
wait). An engine admits a scheduler step's requests one after another, each alloc right behind
the last: the first that outruns the mapped blocks maps the step's slots (and the next steps'),
rather than each request growing by its own slot. When fewer pages are ready than it lacks, they
are kept and it waits for the rest only; the background thread grows ahead of the next allocs.

Short grants. A grant that does not make a whole growth unit (the daemon gave what was free at the
deadline) is kept, unmapped (`CacheState.spare`), and topped up by the next growth: returning it
and asking again would only make the daemon grant the same pages twice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from kvmem.cache.state import CacheState
from kvmem.common import protocol
from kvmem.common.undo import Undo
from kvmem.page_source import Shortfall

# A growth maps what the measured demand uses in HORIZON_S seconds (a second: growths under steady
# demand about a second apart, each one set-access call per range), up to MAX_BURST slots at once
# (16 slots of a 32-layer model's 2 MiB pages: 2 GiB); DECAY_S seconds without a growth bring the
# high watermark back to the configured one. A rate is measured over at least MIN_SPAN_S, so that
# a growth right behind the previous one is not sized from a few microseconds. (MAX_BURST is the
# protocol's: the daemon keeps that many growth units made for an engine whose first burst has
# not come yet.)
HORIZON_S = 1.0
MAX_BURST = protocol.MAX_BURST_SLOTS
DECAY_S = 2.0
MIN_SPAN_S = 0.001
# How long the background thread's growth waits for the daemon (an alloc with mapped free blocks
# never waits for it: the background thread holds only the grow lock meanwhile). Long enough for
# a burst to be granted whole while the daemon makes its pages; short enough that a reclaim
# (RECLAIM_DEADLINE_MS, 2 s), which the same thread answers, is not kept waiting past its deadline.
BACKGROUND_WAIT_S = 1.0

# The clock growth decisions read (tests replace it to make the sizing exact).
clock: Callable[[], float] = time.monotonic


class DemandMeter:
    """The demand on one block allocator, measured as the module docstring says (`rate`), and what
    it uses in `HORIZON_S` (`blocks`). `since`: when the last growth was decided, and the blocks in
    use then plus those it was made for; whoever grows sets it (`restart`, from `decision`).
    `first_take`: when the first request after that took its blocks, and the blocks in use just
    after it (None until one has); the allocator reports it (`arm_first_take`), the meter being
    the only user of its allocator's hook."""

    def __init__(self, allocator, high_watermark: int, blocks_per_slot: int):
        self.allocator = allocator
        self.ceiling = high_watermark + (MAX_BURST - 1) * blocks_per_slot
        self.first_take: tuple[float, int] | None = None
        self.restart((clock(), allocator.get_num_used_blocks()))

    def restart(self, decided: tuple[float, int]) -> None:
        """A growth decided at `decided` (`decision`) mapped slots: the next rate counts from there."""
        self.since = decided
        self.first_take = None
        self.allocator.arm_first_take(self._note_first_take)

    def _note_first_take(self, used: int) -> None:
        self.first_take = (clock(), used)

    def rate(self, pending: int = 0) -> float:
        """Blocks per second taken since the last growth was decided, net of frees (0 if fewer now),
        counting `pending` blocks an alloc is about to take.

        Measured over the whole time since the decision, at least `MIN_SPAN_S`: a quiet spell lowers
        it, so one request after it is not mistaken for a burst. Or, if higher, from the first
        request after the decision, counting the blocks taken after it: the requests that follow it
        make the rate, not the quiet spell before it. (Either measure alone misleads: the first
        counts a burst's quiet prelude as demand time; the second knows nothing of a lone request.)
        """
        now = clock()
        used = self.allocator.get_num_used_blocks() + pending
        rates = [0.0]
        for start, used_then in (self.since, self.first_take or self.since):
            if used > used_then:
                rates.append((used - used_then) / max(now - start, MIN_SPAN_S))
        return max(rates)

    def blocks(self, pending: int = 0) -> int:
        """What `rate` (`pending` counted) uses in `HORIZON_S`, at most `MAX_BURST - 1` slots beyond
        the high watermark."""
        return min(math.ceil(self.rate(pending) * HORIZON_S), self.ceiling)

    def decision(self, served: int = 0) -> tuple[float, int]:
        """What `since` becomes if a growth decided now maps anything: the next rate counts from here,
        the `served` blocks it is made for (an alloc about to take them) not counted as demand."""
        return clock(), self.allocator.get_num_used_blocks() + served


class Growth:
    """The growth and shrink policy of one cache (see the module docstring).

    Attributes:
        low_watermark: Below this many mapped free blocks the background thread grows...
        high_watermark: ...up to this many (plus less than a slot), or up to what the demand uses in
            `HORIZON_S` if that is more (`headroom`); a slot or more beyond `headroom` shrinks.
        grow_wait: Seconds an on-demand growth waits for the daemon's pages.
        target_pages: The daemon's target for this model's pages (-1: none).
        reclaim_pages: Pages the daemon asked back and has not got yet.
        raised_high: The high watermark as the last growth's demand raised it (blocks); it lapses
            `DECAY_S` after the last growth (`headroom`).
        demand: The demand on the cache's block allocator (`DemandMeter`).
    """

    def __init__(self, state: CacheState, low_watermark: int | None, high_watermark: int | None, grow_wait: float):
        self.state = state
        self.blocks_per_slot = state.slots.layout.blocks_per_slot
        self.per_growth = state.slots.pages_per_growth
        self.low_watermark = self.blocks_per_slot // 2 if low_watermark is None else low_watermark
        self.high_watermark = max(
            self.low_watermark, self.blocks_per_slot if high_watermark is None else high_watermark
        )
        self.grow_wait = grow_wait
        self.target_pages = -1
        self.reclaim_pages = 0
        self.raised_high = self.high_watermark
        self._last_growth = float("-inf")  # when the last growth ended (the headroom's decay counts from it)
        self.demand = DemandMeter(state.allocator, self.high_watermark, self.blocks_per_slot)

    def demand_slots(self, free: int) -> int:
        """Slots a growth ahead of demand maps now, with `free` mapped free blocks (grow lock held).

        Enough to bring the free blocks to `DemandMeter.blocks`, at least to the high watermark; at least
        one. Raises `raised_high` to that level, so that the slots are not shrunk straight back.
        """
        level = self.raised_high = max(self.high_watermark, self.demand.blocks())
        return max(1, -(-(level - free) // self.blocks_per_slot))

    def headroom(self) -> int:
        """The high watermark now: the configured one, or the level the last growth's demand raised it
        to (`demand_slots`) until `DECAY_S` after the last growth."""
        if clock() - self._last_growth > DECAY_S:
            self.raised_high = self.high_watermark
        return max(self.high_watermark, self.raised_high)

    # ---- the daemon's requests (reader thread: record and wake the background thread) ----

    def reclaim(self, pages: int, reason: str) -> None:
        # RECLAIM is budget pressure only: a lowered limit comes as POLICY, whose target the cache
        # follows (set_target), so every RECLAIM counts.
        self.reclaim_pages += pages
        self.state.notify()

    def set_target(self, target_pages: int) -> None:
        self.target_pages = target_pages
        self.state.notify()

    def effective_target(self) -> int:
        """Pages the cache may hold now: -1 for no target, 0 while asleep."""
        return 0 if self.state.asleep else self.target_pages

    def over_target(self) -> bool:
        held = len(self.state.slots.mapped) * self.per_growth
        return 0 <= self.effective_target() < held

    def wants_shrink(self) -> bool:
        """Whether emptied slots should go back now (a reclaim is pending or the cache is over target)."""
        return self.reclaim_pages > 0 or self.over_target()

    # ---- growth ----

    def grow_for(self, blocks: int) -> Shortfall | None:
        """Grow until `blocks` blocks are free, or growth is refused (then why).

        An alloc that outran the background thread waits here for the fewest pages: after the growth
        under way, if any (it holds the grow lock), for the slots it lacks, no more. With them it maps
        the whole slots the demand fills beyond them (`DemandMeter.blocks`, this alloc counted) if their
        pages are ready (`grow_with_demand`): an engine that admits a step's requests one after another grows
        once for the step, not once per request. Its blocks count as served by this growth, not as
        new demand for the next one.
        """
        state = self.state
        with state.grow_lock:
            free = state.allocator.get_num_free_blocks()
            short = blocks - free
            if short <= 0:
                return None
            bps = self.blocks_per_slot
            needed = -(-short // bps)
            # The whole slots the demand fills beyond this alloc's: none for a lone request after a
            # quiet spell (the background thread keeps the watermarks), many within a burst.
            level = self.demand.blocks(pending=blocks)
            wanted = max(needed, (level - free + blocks) // bps)
            slots = state.allocator.get_unmapped_slots(wanted)
            return self.grow_with_demand(slots[:needed], slots[needed:], level, self.grow_wait, served=blocks)

    def grow_with_demand(
        self, targets: list[int], ahead: list[int], level: int, wait: float, served: int = 0
    ) -> Shortfall | None:
        """Map `targets`, waiting up to `wait` for their pages, and with them `ahead` if the source has
        their pages ready now (grow lock held); why not `targets`, if so.

        One growth when the pages are ready (the steady state: the daemon's reserve, the model's own
        pages): `targets` and `ahead` in one go, one set-access call per range and run. Otherwise
        the ready pages are kept (`CacheState.spare`) and the growth waits for `targets` only, so
        that the alloc behind it waits for no page it does not need. `level`: the free blocks the
        demand keeps; slots mapped ahead raise the high watermark (`raised_high`) to it, or to the
        free blocks once they are mapped if more, so that they are not shrunk straight back.
        """
        state = self.state
        target = self.effective_target()
        if target >= 0:  # never ahead past the daemon's target (the model's limit): the rest would be denied
            room = target // self.per_growth - state.allocator.get_num_mapped_slots() - len(targets)
            ahead = ahead[: max(0, room)]
        if ahead:
            self.grow_slots(
                len(targets) + len(ahead), 0.0, targets + ahead, served, ready_only=True, at_least=len(targets)
            )
            if state.allocator.is_mapped(ahead[0]):
                self.raised_high = max(self.raised_high, level, state.allocator.get_num_free_blocks())
            targets = [slot for slot in targets if not state.allocator.is_mapped(slot)]
            if not targets:
                return None
        return self.grow_slots(len(targets), wait, targets, served)

    def map_slots(self, wanted: list[int], wait: float, ahead: Sequence[int] = ()) -> Shortfall | None:
        """Map those of `wanted` (sorted slot numbers) not mapped yet, and with them those of `ahead`
        whose pages are ready (`grow_with_demand`); why not all of `wanted`, if so."""
        state = self.state
        with state.grow_lock:  # only its holders map: what is unmapped now stays so
            todo = [slot for slot in wanted if not state.allocator.is_mapped(slot)]
            if not todo:
                return None
            extra = [slot for slot in dict.fromkeys(ahead) if slot not in todo and not state.allocator.is_mapped(slot)]
            return self.grow_with_demand(todo, extra, self.demand.blocks() if extra else 0, wait)

    def grow_slots(
        self,
        slots: int,
        wait: float,
        targets: list[int] | None = None,
        served: int = 0,
        ready_only: bool = False,
        at_least: int = 1,
    ) -> Shortfall | None:
        """Map `slots` more slots (grow lock held); why fewer, if so.

        `targets` are the unmapped slots to map, in order (default: the lowest unmapped ones); a
        short grant maps the first of them, if they are `at_least` slots (else it maps none and keeps
        every page for the next growth). `served`: blocks an alloc waiting on this growth is about
        to take (not counted as demand by the next `DemandMeter.rate`). `ready_only`: only the pages the
        source has ready (`PageSource.acquire_ready`), `wait` unused.
        """
        state = self.state
        decided = self.demand.decision(served)
        if targets is None:
            targets = state.allocator.get_unmapped_slots(slots)
        if not targets:
            return Shortfall("capacity", f"all {state.slots.layout.max_slots} slots of the virtual capacity are mapped")
        per = self.per_growth
        t0 = time.perf_counter()
        # Pages kept from a short grant count towards this growth: ask only for the rest.
        want = len(targets) * per - len(state.spare)
        grant = None
        if want > 0:
            grant = state.source.acquire_ready(want) if ready_only else state.source.acquire(want, wait)
        got = state.spare + (grant.pages if grant is not None else [])
        usable = min(len(got) // per, len(targets))
        if usable < at_least:
            usable = 0
        state.spare = got[usable * per :]  # a partial growth unit waits for the next growth
        targets = targets[:usable]
        pages = got[: usable * per]
        with Undo() as undo:
            undo.push(state.source.release, pages)  # `map` undoes its own mappings: the pages are unused
            state.slots.map(targets, pages)
        for slot in targets:
            state.allocator.add_slot(slot)
        if targets:
            self.demand.restart(decided)  # the next rate counts the blocks taken while this growth waited
            self._last_growth = clock()  # when it ended: a slow grant is no pause in demand
            state.counters.grows += 1
            state.counters.last_grow_s = time.perf_counter() - t0
            state.report_usage()
        if usable < slots:
            return (grant.shortfall if grant is not None else None) or Shortfall("capacity")
        return None

    # ---- shrink ----

    def shrink(self, max_slots: int | None = None) -> int:
        """Unmap and give back up to `max_slots` empty slots (all empty ones by default); how many."""
        state = self.state
        with state.engine.lock:  # lock order: engine, grow, allocator (kvmem.cache.state)
            with state.grow_lock:
                # One call: no alloc can take a block of a chosen slot between choosing and removing it.
                chosen = state.allocator.remove_empty_slots(max_slots)
                state.release_spare()  # shrinking: no growth will need them
                if not chosen:
                    return 0
                unmapped = state.slots.unmap(chosen)
                state.source.release([page for entry in unmapped for page in entry.pages])
                state.counters.shrinks += 1
                state.report_usage()
            if state.engine.on_unmapped is not None:
                state.engine.on_unmapped(chosen)
            return len(chosen)

    def shrink_as_asked(self) -> None:
        """Give back what the daemon's reclaims and target ask for, evicting the engine's droppable
        blocks first if too few slots are empty."""
        state = self.state
        want_slots = 0
        if self.reclaim_pages > 0:
            want_slots = -(-self.reclaim_pages // self.per_growth)
        if self.over_target():
            excess = len(state.slots.mapped) * self.per_growth - self.effective_target()
            want_slots = max(want_slots, -(-excess // self.per_growth))
        if want_slots:
            with state.engine.lock:
                short = want_slots - len(state.allocator.get_empty_slots())
                if short > 0 and state.engine.evictor is not None and not state.asleep:
                    state.engine.evictor(short)  # the engine frees what it can drop, so that slots empty
                done = self.shrink(want_slots)
            self.reclaim_pages = max(0, self.reclaim_pages - done * self.per_growth)

    # ---- the background thread's step ----

    def keep_watermarks(self) -> None:
        """Shrink a surplus of a slot or more beyond the high watermark; grow below the low one."""
        state = self.state
        high = self.headroom()
        surplus = state.allocator.get_num_free_blocks() - high
        if surplus >= self.blocks_per_slot:
            # A whole slot or more beyond the high watermark: give empty slots back, so an idle
            # cache shrinks to its live blocks plus the watermark. (Growth stops at the high
            # watermark plus less than a slot, so the two never chase each other; the demand's
            # raised watermark lasts until it decays.)
            self.shrink(surplus // self.blocks_per_slot)
        if state.allocator.get_num_free_blocks() < self.low_watermark and not self.over_target():
            with state.grow_lock:
                free = state.allocator.get_num_free_blocks()
                if free >= self.low_watermark:
                    return  # an alloc grew meanwhile
                needed = -(-(self.high_watermark - free) // self.blocks_per_slot)
                slots = max(self.demand_slots(free), needed)
                wait = min(self.grow_wait, BACKGROUND_WAIT_S)
                mapped = state.allocator.get_num_mapped_slots()
                shortfall = self.grow_slots(slots, wait)
                if shortfall is not None and slots > needed and state.allocator.get_num_mapped_slots() == mapped:
                    # The demand's growth was refused outright (more than the budget leaves): what is needed.
                    self.raised_high = self.high_watermark
                    self.grow_slots(needed, wait)
