"""Back-pressure bookkeeping (``vask.broker.backpressure``): lag per worker from the
batches it has not reported, publish answers parked while a worker they reach lags
more than the bound, released when it catches up, after ``max_hold``, or when it left."""

from __future__ import annotations

from vask.broker.backpressure import Backpressure
from vask.envelope import Reply

W1, W2 = b"w1", b"w2"
ALIVE = {W1, W2}


def ok(rid: int) -> Reply:
    return Reply(rid, {"ok": True})


def test_lag_is_the_age_of_the_oldest_unreported_batch() -> None:
    bp = Backpressure(0.1, 2.5)
    assert bp.lag(W1, 10.0) == 0.0
    bp.sent(W1, 1, 10.0)
    bp.sent(W1, 2, 10.2)
    assert bp.lag(W1, 10.5) == 0.5
    bp.caught(W1, 1)
    assert abs(bp.lag(W1, 10.5) - 0.3) < 1e-9
    bp.caught(W1, 2)
    assert bp.lag(W1, 10.5) == 0.0


def test_an_answer_waits_only_for_a_lagging_worker_it_reaches() -> None:
    bp = Backpressure(0.1, 2.5)
    bp.sent(W1, 1, 10.0)  # W1 has not handled batch 1 for 0.5 s at t=10.5
    bp.sent(W2, 1, 10.45)  # W2 is 0.05 s behind: within the bound
    ready = bp.hold([(b"p", ok(1), (W1, W2)), (b"p", ok(2), (W2,)), (b"p", ok(3), ())],
                    10.5, ALIVE)
    assert [r.rid for _, r in ready] == [2, 3]
    assert [p[2].rid for p in bp.parked] == [1]
    assert bp.release(10.6, ALIVE) == []  # still behind
    bp.caught(W1, 1)
    assert bp.release(10.7, ALIVE) == []  # W2 is now 0.25 s behind: it waits for both
    bp.caught(W2, 1)
    assert [r.rid for _, r in bp.release(10.7, ALIVE)] == [1]
    assert not bp.parked and bp.released_late == 0


def test_refusals_are_never_parked() -> None:
    bp = Backpressure(0.1, 2.5)
    bp.sent(W1, 1, 0.0)
    refused = Reply(9, {"ok": False, "error": "recovering"})
    assert bp.hold([(b"p", refused, (W1,))], 5.0, ALIVE) == [(b"p", refused)]


def test_an_answer_is_released_after_max_hold_even_if_the_worker_still_lags() -> None:
    bp = Backpressure(0.1, 2.5)
    bp.sent(W1, 1, 0.0)
    assert bp.hold([(b"p", ok(1), (W1,))], 1.0, ALIVE) == []
    assert bp.release(3.4, ALIVE) == []
    assert [r.rid for _, r in bp.release(3.5, ALIVE)] == [1]
    assert bp.released_late == 1


def test_a_worker_that_left_or_restarted_its_numbering_holds_nothing() -> None:
    bp = Backpressure(0.1, 2.5)
    bp.sent(W1, 1, 0.0)
    bp.sent(W2, 1, 0.0)
    assert bp.hold([(b"p", ok(1), (W1,)), (b"p", ok(2), (W2,))], 1.0, ALIVE) == []
    bp.forget(W1)  # a new hello: its numbering restarts
    assert [r.rid for _, r in bp.release(1.1, ALIVE)] == [1]
    assert [r.rid for _, r in bp.release(1.2, {W1})] == [2]  # W2 was purged
    assert bp.pending == {}


def test_bound_zero_tracks_and_parks_nothing() -> None:
    bp = Backpressure(0.0, 2.5)
    bp.sent(W1, 1, 0.0)
    assert bp.pending == {}
    assert bp.hold([(b"p", ok(1), (W1,))], 100.0, ALIVE) == [(b"p", ok(1))]
