"""`kvmemd.arbiter`: the arbitration policy on constructed states. Plain data in, decisions out."""

from __future__ import annotations

from kvmem.common.status import ModelState
from kvmemd.arbiter import BACKFILL_S, Deny, Expire, Grant, Reclaim, Request, Share, Supply, Wait, arbitrate

NOW = 100.0
LATER = NOW + 5.0  # a deadline still ahead


def share(name: str, **fields) -> Share:
    return Share(
        name=name, state=fields.pop("state", ModelState.AWAKE), attached=fields.pop("attached", True), **fields
    )


def models(*shares: Share) -> dict[str, Share]:
    return {s.name: s for s in shares}


def supply(free: int = 0, coming: int = 0, created: int = 32, budget_pages: int = 32, granted: int = 0) -> Supply:
    return Supply(free=free, coming=coming, created=created, budget_pages=budget_pages, granted=granted)


def test_a_request_the_free_pages_cover_is_granted_in_full():
    decisions = arbitrate([Request(1, "a", 3, LATER)], models(share("a")), supply(free=5), NOW)
    assert decisions == [Grant(1, 3)]


def test_models_below_their_minimum_come_first_then_higher_priority_then_arrival():
    shares = models(
        share("early", priority=0),
        share("urgent", priority=5),
        share("guaranteed", min_pages=4, held=1),
        share("late", priority=0),
    )
    requests = [
        Request(1, "early", 1, LATER),
        Request(2, "urgent", 1, LATER),
        Request(3, "late", 1, LATER),
        Request(4, "guaranteed", 1, LATER),
    ]
    decisions = arbitrate(requests, shares, supply(free=4), NOW)
    assert decisions == [Grant(4, 1), Grant(2, 1), Grant(1, 1), Grant(3, 1)]


def test_arrival_order_is_the_sequence_number_not_the_list_order():
    shares = models(share("a"), share("b"))
    decisions = arbitrate([Request(9, "a", 1, LATER), Request(2, "b", 1, LATER)], shares, supply(free=1, coming=1), NOW)
    assert decisions == [Grant(2, 1), Wait(9, 1)]


def test_a_model_at_its_minimum_is_no_longer_served_first():
    shares = models(share("guaranteed", min_pages=4, held=4), share("urgent", priority=1))
    decisions = arbitrate(
        [Request(1, "guaranteed", 1, LATER), Request(2, "urgent", 1, LATER)], shares, supply(free=2), NOW
    )
    assert decisions == [Grant(2, 1), Grant(1, 1)]


def test_a_model_at_its_limit_is_denied():
    decisions = arbitrate([Request(1, "a", 1, LATER)], models(share("a", limit_pages=4, held=4)), supply(free=8), NOW)
    assert decisions == [Deny(1, "limit", "model a holds 4 pages, its limit")]


def test_a_request_over_the_limit_gets_the_room_then_a_denial():
    decisions = arbitrate([Request(1, "a", 6, LATER)], models(share("a", limit_pages=4, held=1)), supply(free=8), NOW)
    assert decisions == [Grant(1, 3), Deny(1, "limit", "model a reached its limit of 4 pages")]


def test_the_limit_counts_pages_granted_earlier_in_the_same_pass():
    shares = models(share("a", limit_pages=3))
    decisions = arbitrate([Request(1, "a", 2, LATER), Request(2, "a", 2, LATER)], shares, supply(free=8), NOW)
    assert decisions == [Grant(1, 2), Grant(2, 1), Deny(2, "limit", "model a reached its limit of 3 pages")]


def test_a_sleeping_model_is_denied_but_its_restore_is_served():
    for state in (ModelState.DRAINING, ModelState.ASLEEP, ModelState.WAKING):
        decisions = arbitrate([Request(1, "a", 1, LATER)], models(share("a", state=state)), supply(free=4), NOW)
        assert decisions == [Deny(1, "asleep", f"model a is {state.name.lower()}")]
    restore = Request(2, "a", 3, float("inf"), restore=True)
    assert arbitrate([restore], models(share("a", state=ModelState.WAKING)), supply(free=4), NOW) == [Grant(2, 3)]


def test_a_restore_that_meets_the_limit_waits_instead_of_being_denied():
    shares = models(share("a", state=ModelState.WAKING, limit_pages=2, held=2))
    decisions = arbitrate([Request(1, "a", 3, float("inf"), restore=True)], shares, supply(free=8), NOW)
    assert decisions == [Wait(1, 0, "3 pages to restore: the limit of 2 pages leaves no room")]


def test_a_restore_that_meets_a_limit_lowered_during_the_wake_takes_its_room_and_waits():
    shares = models(share("a", state=ModelState.WAKING, limit_pages=4, held=2))
    decisions = arbitrate([Request(1, "a", 5, float("inf"), restore=True)], shares, supply(free=8), NOW)
    assert decisions == [Grant(1, 2), Wait(1, 0, "3 pages to restore: the limit of 4 pages leaves no room")]


def test_a_restore_short_of_pages_says_what_it_waits_for():
    shares = models(share("a", state=ModelState.WAKING), share("b", held=30, used=30))
    decisions = arbitrate([Request(1, "a", 5, float("inf"), restore=True)], shares, supply(free=2, granted=30), NOW)
    assert decisions == [
        Grant(1, 2),
        Reclaim("b", 3, 1),
        Wait(1, 3, "3 more pages: 32 of 32 pages exist, 32 granted"),
    ]


def test_a_request_still_short_at_its_deadline_gets_what_is_free_and_a_denial_with_the_budget():
    shares = models(share("a"))
    decisions = arbitrate([Request(1, "a", 4, NOW)], shares, supply(free=1, created=30, granted=29), NOW)
    assert decisions == [
        Grant(1, 1),
        Deny(1, "budget", "no free page within the wait: 30 of 32 pages exist, 30 granted"),
    ]


def test_a_request_before_its_deadline_holds_the_free_page_and_waits_for_pages_being_made():
    decisions = arbitrate([Request(1, "a", 4, LATER)], models(share("a")), supply(free=1, coming=3), NOW)
    assert decisions == [Wait(1, 4)]  # the pool's demand: 4 ready for it; granted in full then


def test_several_requests_share_the_free_pages_then_the_coming_ones_then_reclaim():
    shares = models(share("a"), share("b"), share("c"), share("idle", held=10))
    requests = [Request(1, "a", 2, LATER), Request(2, "b", 2, LATER), Request(3, "c", 2, LATER)]
    decisions = arbitrate(requests, shares, supply(free=3, coming=2), NOW)
    assert decisions == [
        Grant(1, 2),
        Wait(2, 2),  # it holds the free page left and waits for one coming page
        Reclaim("idle", 1, 3),  # one coming page left for two wanted
        Wait(3, 2),
    ]


def test_a_request_for_more_than_the_budget_is_denied_at_once():
    shares = models(share("greedy", held=4), share("small"))
    requests = [Request(1, "greedy", 29, LATER), Request(2, "small", 1, LATER)]
    decisions = arbitrate(requests, shares, supply(free=6, granted=4), NOW)
    assert decisions == [
        Deny(1, "budget", "29 pages asked; the budget is 32 pages and model greedy holds 4"),
        Grant(2, 1),  # nothing is held back for a request that can never be served
    ]


def test_a_young_large_request_leaves_the_free_pages_to_small_ones_it_cannot_use():
    shares = models(share("big"), share("s1"), share("s2"), share("s3"))
    requests = [
        Request(1, "big", 8, LATER, started=NOW),
        Request(2, "s1", 1, LATER, started=NOW),
        Request(3, "s2", 1, LATER, started=NOW),
        Request(4, "s3", 1, LATER, started=NOW),
    ]
    decisions = arbitrate(requests, shares, supply(free=4, coming=4), NOW)
    assert decisions == [Wait(1, 8), Grant(2, 1), Grant(3, 1), Grant(4, 1)]


def test_after_the_backfill_window_the_free_pages_are_held_for_the_large_request():
    shares = models(share("big"), share("s1"), share("s2"))
    waited = NOW - BACKFILL_S
    requests = [
        Request(1, "big", 8, LATER, started=waited),
        Request(2, "s1", 1, LATER, started=NOW),
        Request(3, "s2", 1, LATER, started=NOW),
    ]
    assert arbitrate(requests, shares, supply(free=4, coming=4), NOW) == [Wait(1, 8), Wait(2, 1), Wait(3, 1)]
    # Once the free pages cover it, it is granted in full, and the small ones have the rest.
    assert arbitrate(requests, shares, supply(free=9, coming=1), NOW) == [Grant(1, 8), Grant(2, 1), Wait(3, 1)]


def test_reclaim_asks_the_lowest_priority_first_then_the_most_idle():
    shares = models(
        share("requester"),
        share("important", priority=9, held=8),
        share("less-idle", held=4, used=2),
        share("more-idle", held=4, used=0),
        share("cheap", priority=-1, held=2, used=1),
    )
    decisions = arbitrate([Request(1, "requester", 9, LATER)], shares, supply(), NOW)
    assert decisions == [
        Reclaim("cheap", 1, 1),
        Reclaim("more-idle", 4, 1),
        Reclaim("less-idle", 2, 1),
        Reclaim("important", 2, 1),  # idle pages first, everywhere
        Wait(1, 9),
    ]


def test_reclaim_takes_idle_pages_before_pages_that_need_eviction():
    shares = models(share("requester"), share("busy", priority=-5, held=6, used=6), share("idle", held=3, used=0))
    decisions = arbitrate([Request(1, "requester", 5, LATER)], shares, supply(), NOW)
    assert decisions == [Reclaim("idle", 3, 1), Reclaim("busy", 2, 1), Wait(1, 5)]


def test_reclaim_never_goes_below_a_minimum_nor_to_sleeping_detached_or_requesting_models():
    shares = models(
        share("requester", held=10),
        share("guaranteed", held=5, min_pages=4),
        share("asleep", held=5, state=ModelState.ASLEEP),
        share("detached", held=5, attached=False),
    )
    decisions = arbitrate([Request(1, "requester", 8, LATER)], shares, supply(), NOW)
    assert decisions == [Reclaim("guaranteed", 1, 1), Wait(1, 8)]


def test_pages_already_asked_for_are_not_asked_again_until_the_ask_lapses():
    shares = models(share("requester"), share("holder", held=6, asked=4, asked_until=NOW + 1))
    assert arbitrate([Request(1, "requester", 6, LATER)], shares, supply(), NOW) == [
        Reclaim("holder", 2, 1),
        Wait(1, 6),
    ]
    after = NOW + 2
    assert arbitrate([Request(1, "requester", 6, after + 1)], shares, supply(), after) == [
        Expire("holder"),
        Reclaim("holder", 6, 1),
        Wait(1, 6),
    ]


def test_a_request_asks_only_for_what_it_did_not_ask_for_before():
    shares = models(share("requester"), share("holder", held=6))
    asked_before = Request(1, "requester", 5, LATER, reclaim_asked=3)
    assert arbitrate([asked_before], shares, supply(), NOW) == [Reclaim("holder", 2, 1), Wait(1, 5)]
    fully_asked = Request(1, "requester", 5, LATER, reclaim_asked=5)
    assert arbitrate([fully_asked], shares, supply(), NOW) == [Wait(1, 5)]


def test_two_requests_do_not_ask_the_same_pages_twice_in_one_pass():
    shares = models(share("a"), share("b"), share("holder", held=3))
    decisions = arbitrate([Request(1, "a", 2, LATER), Request(2, "b", 2, LATER)], shares, supply(), NOW)
    assert decisions == [Reclaim("holder", 2, 1), Wait(1, 2), Reclaim("holder", 1, 2), Wait(2, 2)]
