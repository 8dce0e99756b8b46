"""What the orchestrator does next is a pure function of the definition, the fold and the time."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from newfuse.core.saga import End, Run, Saga, SagaState, StepContext, Wait, next_move
from newfuse.schemas import (
    SagaCommitted,
    SagaRolledBack,
    SagaStarted,
    StepCompleted,
    StepFailed,
    StepStarted,
)

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _order() -> Saga:
    order = Saga("order")

    async def act(ctx: StepContext) -> Any:
        return None

    for name in ("reserve", "charge", "ship"):
        order.step(name, attempts=2, backoff=1.0)(act)
    order.compensate("reserve")(act)
    order.compensate("charge")(act)
    return order


def _state(*events: Any) -> SagaState:
    state = SagaState("s1")
    state.apply_data(
        SagaStarted(saga_id="s1", name="order", steps=["reserve", "charge", "ship"]), ""
    )
    for event in events:
        state.version += 1
        state.apply_data(event, "")
    return state


def _claim(step: str, attempt: int = 1, phase: str = "action", lease: float = 10) -> StepStarted:
    return StepStarted(
        saga_id="s1",
        step=step,
        phase=phase,
        attempt=attempt,
        driver="d",  # type: ignore[arg-type]
        lease_until=NOW + timedelta(seconds=lease),
    )


def _done(step: str, attempt: int = 1, phase: str = "action") -> StepCompleted:
    return StepCompleted(saga_id="s1", step=step, phase=phase, attempt=attempt)  # type: ignore[arg-type]


def _failed(
    step: str, attempt: int = 1, *, retryable: bool = True, at: datetime = NOW
) -> StepFailed:
    return StepFailed(
        saga_id="s1", step=step, attempt=attempt, error="boom", retryable=retryable, timestamp=at
    )


def test_steps_run_in_order_then_the_saga_commits() -> None:
    order = _order()
    assert next_move(order, _state(), NOW) == Run("reserve", "action", 1)
    assert next_move(order, _state(_claim("reserve"), _done("reserve")), NOW) == Run(
        "charge", "action", 1
    )
    everything = [e for s in ("reserve", "charge", "ship") for e in (_claim(s), _done(s))]
    assert next_move(order, _state(*everything), NOW) == End("committed")


def test_the_outcome_stored_inside_an_end_is_folded_before_the_end() -> None:
    before = [e for s in ("reserve", "charge") for e in (_claim(s), _done(s))] + [_claim("ship")]
    last = StepCompleted(saga_id="s1", step="ship", attempt=1, output={"parcel": 7})
    committed = _state(*before, SagaCommitted(saga_id="s1", completed=last))
    assert committed.status == "committed" and committed.outputs["ship"] == {"parcel": 7}
    assert committed.steps["ship"].history[-1] == "action attempt 1 completed"
    # nothing to undo: the failure that ended the saga rides inside its rollback
    refused = _failed("reserve", retryable=False)
    ended = SagaRolledBack(saga_id="s1", failed_step="reserve", error="boom", failed=refused)
    rolled_back = _state(_claim("reserve"), ended)
    assert rolled_back.status == "rolled_back"
    assert rolled_back.steps["reserve"].status == "failed" and not rolled_back.ignored
    # an outcome inside naming another saga is not folded (noted), the end itself still is
    foreign = StepCompleted(saga_id="other", step="ship", attempt=1)
    odd = _state(*before, SagaCommitted(saga_id="s1", completed=foreign))
    assert odd.status == "committed" and odd.steps["ship"].status == "running"
    assert odd.ignored == [", its last outcome: it names saga 'other'"]


def test_a_held_claim_is_waited_for_and_an_expired_one_is_claimed_again() -> None:
    order = _order()
    assert next_move(order, _state(_claim("reserve", lease=5)), NOW) == Wait(
        "reserve", NOW + timedelta(seconds=5)
    )
    # its holder died: the lease ran out with no outcome; even at the last attempt it runs again
    expired = _state(_claim("reserve", attempt=2, lease=-1))
    assert next_move(order, expired, NOW) == Run("reserve", "action", 3)


def test_a_failure_waits_its_backoff_then_retries_then_compensates_newest_first() -> None:
    order = _order()
    once = _state(
        _claim("reserve"),
        _done("reserve"),
        _claim("charge"),
        _done("charge"),
        _claim("ship"),
        _failed("ship"),
    )
    assert next_move(order, once, NOW) == Wait("ship", NOW + timedelta(seconds=1.0))
    assert next_move(order, once, NOW + timedelta(seconds=2)) == Run("ship", "action", 2)
    twice = _state(*_events_until_ship_fails_twice())
    assert next_move(order, twice, NOW) == Run("charge", "compensation", 1)
    charge_undone = _state(
        *_events_until_ship_fails_twice(),
        _claim("charge", phase="compensation"),
        _done("charge", phase="compensation"),
    )
    assert charge_undone.status == "compensating"
    assert next_move(order, charge_undone, NOW) == Run("reserve", "compensation", 1)
    all_undone = _state(
        *_events_until_ship_fails_twice(),
        _claim("charge", phase="compensation"),
        _done("charge", phase="compensation"),
        _claim("reserve", phase="compensation"),
        _done("reserve", phase="compensation"),
    )
    assert next_move(order, all_undone, NOW) == End("rolled_back", "ship", "boom")


def test_a_non_retryable_failure_compensates_at_once() -> None:
    order = _order()
    state = _state(
        _claim("reserve"), _done("reserve"), _claim("charge"), _failed("charge", retryable=False)
    )
    assert next_move(order, state, NOW) == Run("reserve", "compensation", 1)


def test_a_compensation_that_keeps_failing_leaves_the_saga_stuck() -> None:
    order = _order()
    order.get("reserve").compensation_attempts = 2
    base = [
        _claim("reserve"),
        _done("reserve"),
        _claim("charge"),
        _failed("charge", retryable=False),
    ]
    undo = [
        _claim("reserve", 1, "compensation"),
        StepFailed(
            saga_id="s1",
            step="reserve",
            phase="compensation",
            attempt=1,
            error="no",
            timestamp=NOW - timedelta(seconds=60),
        ),
        _claim("reserve", 2, "compensation"),
        StepFailed(
            saga_id="s1",
            step="reserve",
            phase="compensation",
            attempt=2,
            error="no",
            timestamp=NOW - timedelta(seconds=60),
        ),
    ]
    assert next_move(order, _state(*base, *undo[:2]), NOW) == Run("reserve", "compensation", 2)
    assert next_move(order, _state(*base, *undo), NOW) == End("stuck", "reserve", "no")


def test_foreign_or_misplaced_events_are_noted_not_applied() -> None:
    state = _state(_done("nosuch"), StepCompleted(saga_id="other", step="reserve", attempt=1))
    assert len(state.ignored) == 2
    assert all(step.status == "pending" for step in state.steps.values())


def _events_until_ship_fails_twice() -> list[Any]:
    long_ago = NOW - timedelta(seconds=60)
    return [
        _claim("reserve"),
        _done("reserve"),
        _claim("charge"),
        _done("charge"),
        _claim("ship"),
        _failed("ship", at=long_ago),
        _claim("ship", 2),
        _failed("ship", 2, at=long_ago),
    ]


def test_a_copy_of_the_fold_takes_more_events_and_leaves_the_original_as_it_was() -> None:
    original = _state(_claim("reserve"), _done("reserve"), _claim("charge"))
    before = copy.deepcopy(original)
    copied = original.copy()
    assert copied == original
    for event in (_failed("charge", retryable=False), _claim("reserve", phase="compensation")):
        copied.version += 1
        copied.apply_data(event, "")
    copied.apply_data(SagaStarted(saga_id="s1", name="again", steps=[]), "")  # ignored
    copied.locks["till"] = 3
    copied.requested.append("till")
    assert original == before
    assert copied.steps["charge"].status == "failed" and copied.ignored
    assert copied.steps["reserve"].history != original.steps["reserve"].history
