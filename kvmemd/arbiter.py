"""The arbitration policy: who gets pages, who is refused, and whom to ask for pages back.

Design note
-----------
`arbitrate` is a pure function: plain data in (the waiting requests, each model's policy and
holdings, the pool's supply, the clock), a list of decisions out. It sends nothing and changes
nothing; the daemon (`kvmemd.grants`) carries the decisions out in order. It reads each model
through the `ModelView` fields only: the daemon passes its own records (no copy per pass: a pass
runs on every GROW), tests pass `Share`s. The rules:

- Order. Requests are served models below their guaranteed minimum first, then higher priority,
  then arrival (`Request.seq`). The order is fixed at the start of a pass.
- Limit. A model's limit caps what it may hold. A GROW with no room left under it is denied
  (reason ``limit``); one that fills its room and still wants more gets the room, then a DENY.
  A wake's restore that meets the limit waits for it to be raised instead (its `waiting_for` says
  so), also once some of its pages came: a restore is never denied (a denied one would leave the
  model waking for good, its engine asleep).
- Asleep. A GROW from a model that is draining, asleep or waking is denied (``asleep``).
- Never servable. A GROW for more than the whole budget less what its model holds is denied at
  once (``budget``): it could only wait, and hold pages others need, until its deadline. A GROW
  over its limit is served up to the limit, then denied the rest (``limit``).
- Whole grants, backfill, then a hold. A GROW is granted in full, when the free pages cover it:
  pages trickled to a request that cannot complete yet would sit idle in its engine while others
  wait. A request the free pages cannot complete leaves them to the requests after it that they
  do complete (backfill), so one large ask does not starve small ones. Once it has waited
  `BACKFILL_S`, the free pages it needs are held for it (no later request takes them) until they
  are enough, so small asks cannot starve a large one either. At its deadline it gets what is
  free for it and a DENY saying why not more. A wake's restore is the exception: its pages are
  filled from the host tier as they are found, so it takes free pages as they come.
- Supply. Pages the pool is still making (being created or zeroed, or allowed by the budget) are
  shared out in serving order: a request they cover waits for them. The pool may hand out fewer
  pages than granted here (a free page may first need zeroing for another user): the daemon
  grants what it got and the request keeps waiting for the rest, to be decided again on the
  next pass.
- Deadline. A request still short at its deadline is denied (``budget``) with the pool's figures.
- Reclaim. What supply cannot cover is asked back (RECLAIM, reason ``pressure``) from other
  AWAKE, attached models above their minimum: lowest priority first, then the most idle; first
  the pages each engine reports idle, then pages it could free by evicting cached blocks. Never
  below a minimum, never more than a request still lacks beyond what was asked for it already.
- Asks lapse. Pages asked back and not returned by `asked_until` are forgotten (an `Expire`
  decision) so that they may be asked for again.

A limit lowered under what a model holds is not arbitrated here: the engine learns its new
target from POLICY (`kvmemd.control`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvmem.common.status import ModelState

# How long an engine has to return pages asked back before the ask may be repeated.
RECLAIM_DEADLINE_MS = 2_000
# How long a request that free pages cannot complete lets later requests take them (see the note).
BACKFILL_S = 0.2


class ModelView(Protocol):
    """What the arbiter reads of a model (the fields of `Share`, which documents them); never written."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> ModelState: ...
    @property
    def attached(self) -> bool: ...
    @property
    def limit_pages(self) -> int: ...
    @property
    def min_pages(self) -> int: ...
    @property
    def priority(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def asked(self) -> int: ...
    @property
    def asked_until(self) -> float: ...


@dataclass(frozen=True)
class Share:
    """A model as the arbiter sees it (a `ModelView` made of plain values).

    Attributes:
        name: The model.
        state: Its state (only AWAKE models are asked for pages).
        attached: Whether an engine is connected for it.
        limit_pages: Its limit, -1 for none.
        min_pages: Its guaranteed minimum.
        priority: Higher is served first and asked last.
        held: Pages its engine holds.
        used: Of those, pages holding live KV blocks (the rest are idle).
        asked: Pages asked back and not yet returned.
        asked_until: When that ask lapses (monotonic seconds).
    """

    name: str
    state: ModelState
    attached: bool
    limit_pages: int = -1
    min_pages: int = 0
    priority: int = 0
    held: int = 0
    used: int = 0
    asked: int = 0
    asked_until: float = 0.0


@dataclass(frozen=True)
class Request:
    """A waiting request: `remaining` pages for `model`, arrived as number `seq`."""

    seq: int
    model: str
    remaining: int
    deadline: float
    restore: bool = False  # a wake's restore from the host tier
    reclaim_asked: int = 0  # pages already asked back on its behalf
    started: float = float("-inf")  # when it arrived (monotonic seconds); it may hold free pages BACKFILL_S later


@dataclass(frozen=True)
class Supply:
    """The pool's side: `free` pages grantable now, `coming` ones being made or allowed by the budget.

    `created`, `budget_pages` and `granted` are the pool's figures, quoted in denials.
    """

    free: int
    coming: int
    created: int
    budget_pages: int
    granted: int


@dataclass(frozen=True)
class Expire:
    """Forget the pages asked of `model`: it did not return them in time; they may be asked again."""

    model: str


@dataclass(frozen=True)
class Grant:
    """Give request `seq` `pages` pages now."""

    seq: int
    pages: int


@dataclass(frozen=True)
class Deny:
    """Answer request `seq` with a DENY: its final answer."""

    seq: int
    reason: str  # "limit", "budget" or "asleep"
    detail: str


@dataclass(frozen=True)
class Reclaim:
    """Ask `model` to give `pages` pages back, on behalf of request `seq`."""

    model: str
    pages: int
    seq: int
    reason: str = "pressure"


@dataclass(frozen=True)
class Wait:
    """Request `seq` keeps waiting for `pages` more pages (the pool's demand); `why` is shown for restores."""

    seq: int
    pages: int
    why: str = ""


Decision = Expire | Grant | Deny | Reclaim | Wait


def arbitrate(
    requests: Sequence[Request], models: Mapping[str, ModelView], supply: Supply, now: float
) -> list[Decision]:
    """Decide the waiting requests.

    Args:
        requests: The waiting requests, in any order (`seq` is the arrival order).
        models: Every model the daemon knows, by name; each request's model must be there.
        supply: The pool's pages.
        now: The clock (monotonic seconds), for deadlines and lapsed asks.

    Returns:
        Decisions in the order to carry them out: `Expire`s first, then per request in serving order
        its `Grant` (if any), the `Reclaim`s made for it, and its final `Deny` or `Wait`. A request
        with neither is fully granted.
    """
    decisions: list[Decision] = []
    asked: dict[str, int] = {}  # pages asked back and not lapsed, by model (none: 0)
    for m in models.values():
        if m.asked > 0:
            lapsed = now > m.asked_until
            if lapsed:
                decisions.append(Expire(m.name))
            asked[m.name] = 0 if lapsed else m.asked
    # What each model holds, as this pass's grants change it; read from a model when first needed
    # (a pass runs on every GROW, and most touch only the requester).
    held = _Holdings(models)
    free, coming = supply.free, supply.coming
    granted_now = 0

    def order(r: Request) -> tuple[bool, int, int]:
        m = models[r.model]
        return (m.held >= m.min_pages, -m.priority, r.seq)

    def budget_detail() -> str:
        return f"{supply.created} of {supply.budget_pages} pages exist, {supply.granted + granted_now} granted"

    def grant(r: Request, pages: int) -> None:
        nonlocal free, granted_now
        if pages:
            decisions.append(Grant(r.seq, pages))
            free -= pages
            held[r.model] += pages
            granted_now += pages

    for r in sorted(requests, key=order):
        m = models[r.model]
        if not r.restore and m.state in (ModelState.DRAINING, ModelState.ASLEEP, ModelState.WAKING):
            decisions.append(Deny(r.seq, "asleep", f"model {m.name} is {m.state.name.lower()}"))
            continue
        limit_room = r.remaining if m.limit_pages < 0 else m.limit_pages - held[m.name]
        if limit_room <= 0 and r.restore:  # the limit was lowered during the wake: wait for it to rise
            why = f"{r.remaining} pages to restore: the limit of {m.limit_pages} pages leaves no room"
            decisions.append(Wait(r.seq, 0, why))
            continue
        if limit_room <= 0:
            decisions.append(Deny(r.seq, "limit", f"model {m.name} holds {held[m.name]} pages, its limit"))
            continue
        if r.restore:
            # Filled from the host tier as pages are found: it takes free pages as they come.
            room = min(r.remaining, limit_room)
            taken = min(room, free)
            grant(r, taken)
            remaining, room = r.remaining - taken, room - taken
            if remaining == 0:
                continue
            if room <= 0:  # the limit was lowered during the wake: the rest waits for it to rise
                why = f"{remaining} pages to restore: the limit of {m.limit_pages} pages leaves no room"
                decisions.append(Wait(r.seq, 0, why))
                continue
            why = f"{remaining} more pages: {budget_detail()}"
            usable = 0  # it took every free page it could
        else:
            room = min(r.remaining, limit_room)  # a GROW over its limit is served up to the limit, then denied
            budget_room = supply.budget_pages - held[m.name]
            if room > budget_room:  # more than the whole budget leaves it: it could wait forever
                detail = (
                    f"{r.remaining} pages asked; the budget is {supply.budget_pages} pages and model {m.name} "
                    f"holds {held[m.name]}"
                )
                decisions.append(Deny(r.seq, "budget", detail))
                continue
            if free >= room:  # whole grants only
                grant(r, room)
                if room < r.remaining:
                    decisions.append(Deny(r.seq, "limit", f"model {m.name} reached its limit of {m.limit_pages} pages"))
                continue
            if now >= r.deadline:  # what is free for it, then the answer
                grant(r, min(room, free))
                decisions.append(Deny(r.seq, "budget", f"no free page within the wait: {budget_detail()}"))
                continue
            # The free pages count towards it (nothing is made or asked back for them); once it has
            # waited BACKFILL_S they are also held for it, else later requests they complete take them.
            usable = free
            if now - r.started >= BACKFILL_S:
                free = 0
            why = ""
        if now >= r.deadline:
            decisions.append(Deny(r.seq, "budget", f"no free page within the wait: {budget_detail()}"))
            continue
        covered = min(room - usable, coming)
        coming -= covered
        shortfall = room - usable - covered
        if shortfall > r.reclaim_asked:
            decisions.extend(_reclaim(r, shortfall - r.reclaim_asked, models, held, asked))
        decisions.append(Wait(r.seq, room, why))
    return decisions


class _Holdings(dict[str, int]):
    """Pages held by model name: a model's `held`, read on first use, then as this pass updates it."""

    def __init__(self, models: Mapping[str, ModelView]):
        super().__init__()
        self._models = models

    def __missing__(self, name: str) -> int:
        self[name] = held = self._models[name].held
        return held


def _reclaim(
    r: Request, pages: int, models: Mapping[str, ModelView], held: dict[str, int], asked: dict[str, int]
) -> list[Reclaim]:
    """Ask models other than `r`'s for up to `pages` pages; `held` and `asked` are this pass's, updated."""

    def askable(m: ModelView) -> int:
        return max(0, held[m.name] - m.min_pages - asked.get(m.name, 0))

    candidates = [
        m
        for m in models.values()
        if m.name != r.model and m.attached and m.state == ModelState.AWAKE and askable(m) > 0
    ]
    candidates.sort(key=lambda m: (m.priority, -(held[m.name] - m.used)))
    asks: list[Reclaim] = []
    total = 0
    for m in candidates:  # first pass: pages the engines report idle
        idle = min(held[m.name] - m.used - asked.get(m.name, 0), askable(m))
        if idle > 0 and total < pages:
            take = min(idle, pages - total)
            asks.append(Reclaim(m.name, take, r.seq))
            asked[m.name] = asked.get(m.name, 0) + take
            total += take
    for m in candidates:  # then pages that an engine could free by evicting cached blocks
        spare = askable(m)
        if total < pages and spare > 0:
            take = min(spare, pages - total)
            asks.append(Reclaim(m.name, take, r.seq))
            asked[m.name] = asked.get(m.name, 0) + take
            total += take
    return asks
