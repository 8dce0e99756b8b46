"""Parallel step groups: the moves they make (a pure function), and real orchestrators running
them concurrently, failing them, compensating them and fencing their outcomes."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_saga_moves import NOW, _claim, _done

from newfuse.core import review as reviews
from newfuse.core.locks import read_lock
from newfuse.core.orchestrator import Orchestrator, read_saga, saga_stream
from newfuse.core.review import Review, Reviewer
from newfuse.core.saga import (
    Acquire,
    End,
    Run,
    Saga,
    SagaState,
    StepContext,
    Wait,
    moves,
    step_outcomes,
)
from newfuse.errors import FuseError, SagaDefinitionError
from newfuse.eventstore import NO_STREAM
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.schemas import NewEvent, SagaRolledBack, SagaStarted, StepFailed, StepStarted
from support import run_fuse, wait_for


class Refused(FuseError):
    """A step that fails for good (not retryable)."""

    retryable = False


async def _nothing(ctx: StepContext) -> None:
    return None


def _shop(*, locks: bool = False) -> Saga:
    """reserve -> [charge, notify] (group "pay") -> ship, each with a compensation."""
    shop = Saga("shop")
    shop.step("reserve")(_nothing)
    shop.step("charge", group="pay", locks=("till",) if locks else ())(_nothing)
    shop.step("notify", group="pay", locks=("mail",) if locks else ())(_nothing)
    shop.step("ship")(_nothing)
    for name in ("reserve", "charge", "notify", "ship"):
        shop.compensate(name)(_nothing)
    return shop


def _state(*events: Any) -> SagaState:
    state = SagaState("s1")
    steps = ["reserve", "charge", "notify", "ship"]
    groups = {"charge": "pay", "notify": "pay"}
    state.apply_data(SagaStarted(saga_id="s1", name="shop", steps=steps, groups=groups), "")
    for event in events:
        state.version += 1
        state.apply_data(event, "")
    return state


def _undo(step: str) -> list[Any]:
    return [_claim(step, phase="compensation"), _done(step, phase="compensation")]


def _refused(step: str) -> StepFailed:
    return StepFailed(saga_id="s1", step=step, attempt=1, error="no", retryable=False)


# -- the moves -----------------------------------------------------------------------------------


def test_a_group_is_declared_by_consecutive_steps_and_its_stages_say_so() -> None:
    shop = _shop()
    assert [[s.name for s in stage] for stage in shop.stages] == [
        ["reserve"],
        ["charge", "notify"],
        ["ship"],
    ]
    assert shop.groups == {"charge": "pay", "notify": "pay"}
    shop.step("wrap", group="gift")(_nothing)
    with pytest.raises(SagaDefinitionError, match="group 'pay' was declared earlier"):
        shop.step("refund", group="pay")(_nothing)


def test_the_steps_of_a_group_run_together_and_the_next_waits_for_all_of_them() -> None:
    shop = _shop()
    after_reserve = [_claim("reserve"), _done("reserve")]
    assert moves(shop, _state(*after_reserve), NOW) == [
        Run("charge", "action", 1),
        Run("notify", "action", 1),
    ]
    one_done = [*after_reserve, _claim("charge"), _claim("notify"), _done("notify")]
    assert moves(shop, _state(*one_done), NOW) == [Wait("charge", NOW + timedelta(seconds=10))]
    both = [*one_done, _done("charge")]
    assert moves(shop, _state(*both), NOW) == [Run("ship", "action", 1)]


def test_a_group_waits_for_one_lock_at_a_time_while_its_other_steps_run() -> None:
    shop = _shop(locks=True)
    state = _state(_claim("reserve"), _done("reserve"))
    assert moves(shop, state, NOW) == [Acquire("charge", "till")]
    state.locks["till"] = 3
    assert moves(shop, state, NOW) == [Run("charge", "action", 1), Acquire("notify", "mail")]


def test_a_failed_group_lets_its_running_steps_finish_starts_nothing_then_compensates() -> None:
    shop = Saga("shop")
    for name in ("reserve", "a", "b", "c", "ship"):
        shop.step(name, group="g" if name in "abc" else None)(_nothing)
        shop.compensate(name)(_nothing)
    state = SagaState("s1")
    steps = ["reserve", "a", "b", "c", "ship"]
    state.apply_data(SagaStarted(saga_id="s1", name="shop", steps=steps), "")
    for event in (_claim("reserve"), _done("reserve"), _claim("a"), _claim("b")):
        state.apply_data(event, "")
    state.apply_data(_refused("a"), "")
    # b is let finish; c (never claimed) does not start
    assert moves(shop, state, NOW) == [Wait("b", NOW + timedelta(seconds=10))]
    # b's driver died: its claim is taken again, to learn whether its effect happened
    assert moves(shop, state, NOW + timedelta(seconds=11)) == [Run("b", "action", 2)]
    state.apply_data(_done("b"), "")
    assert moves(shop, state, NOW) == [Run("b", "compensation", 1)]


def test_compensation_undoes_the_groups_newest_first_and_one_group_together() -> None:
    shop = _shop()
    events = [
        *(e for s in ("reserve", "charge", "notify") for e in (_claim(s), _done(s))),
        _claim("ship"),
        _refused("ship"),
    ]
    assert moves(shop, _state(*events), NOW) == [
        Run("charge", "compensation", 1),
        Run("notify", "compensation", 1),
    ]
    charge_undone = [*events, *_undo("charge")]
    assert moves(shop, _state(*charge_undone), NOW) == [Run("notify", "compensation", 1)]
    both = [*charge_undone, *_undo("notify")]
    assert moves(shop, _state(*both), NOW) == [Run("reserve", "compensation", 1)]
    undone = [*both, *_undo("reserve")]
    assert moves(shop, _state(*undone), NOW) == [End("rolled_back", "ship", "no")]


# -- real orchestrators --------------------------------------------------------------------------


class Gates:
    """Steps that each wait for the others of their group: run one at a time, they time out."""

    def __init__(self, *names: str) -> None:
        self.arrived = {name: asyncio.Event() for name in names}

    async def meet(self, name: str) -> None:
        self.arrived[name].set()
        for event in self.arrived.values():
            await event.wait()


def _concurrent(log: list[str], *, fail: str | None = None) -> Saga:
    """reserve -> [charge, notify] (group "pay", which only finishes if both run at once) ->
    ship; `fail` fails for good. When it is ship, the group's two compensations also wait for
    each other."""
    saga = Saga("concurrent")
    gates = Gates("charge", "notify")
    undo_gates = Gates("charge", "notify") if fail == "ship" else Gates()

    def action(name: str) -> Any:
        async def run(ctx: StepContext) -> dict[str, Any]:
            log.append(name)
            if name in gates.arrived:
                await gates.meet(name)
            if name == fail:
                raise Refused(f"{name} refused")
            return {"step": name, "saw": sorted(ctx.outputs)}

        return run

    def undo(name: str) -> Any:
        async def run(ctx: StepContext) -> None:
            log.append(f"undo {name}")
            if name in undo_gates.arrived:
                await undo_gates.meet(name)

        return run

    for name in ("reserve", "charge", "notify", "ship"):
        group = "pay" if name in ("charge", "notify") else None
        saga.step(name, group=group, timeout=5, attempts=1)(action(name))
        saga.compensate(name)(undo(name))
    return saga


async def test_a_group_runs_its_steps_concurrently_and_the_next_step_sees_all_outputs(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    async with Orchestrator(store, [_concurrent(log)]) as orchestrator:
        saga_id = await orchestrator.start("concurrent")
        state = await orchestrator.wait(saga_id, timeout=20)
    assert state.status == "committed", state.error
    assert log[0] == "reserve" and sorted(log[1:3]) == ["charge", "notify"] and log[3] == "ship"
    assert state.outputs["ship"]["saw"] == ["charge", "notify", "reserve"]
    events = [event async for event in store.read(saga_stream(saga_id))]
    types = [(e.type, getattr(e.data, "step", "")) for e in events]
    # the group's claims are one append: adjacent, before either outcome
    claims = [i for i, t in enumerate(types) if t[0] == "saga.step_started"]
    assert types[claims[1]][1] == "charge" and types[claims[2]][1] == "notify"
    assert claims[2] == claims[1] + 1
    # the last outcome is stored inside the commit: one write
    assert types[-1][0] == "saga.committed" and events[-1].data.completed.step == "ship"


async def test_a_step_of_a_group_failing_for_good_compensates_every_completed_step(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    async with Orchestrator(store, [_concurrent(log, fail="charge")]) as orchestrator:
        state = await orchestrator.wait(await orchestrator.start("concurrent"), timeout=20)
    assert state.status == "rolled_back"
    assert (state.failed_step, state.error) == ("charge", "Refused: charge refused")
    assert "ship" not in log
    # notify ran on while charge failed, and completed: it is undone with reserve, after it
    assert state.steps["notify"].status == "compensated"
    assert state.steps["charge"].status == "failed"
    assert log[-2:] == ["undo notify", "undo reserve"]


async def test_a_failing_last_step_undoes_the_group_together_then_the_steps_before_it(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    async with Orchestrator(store, [_concurrent(log, fail="ship")]) as orchestrator:
        state = await orchestrator.wait(await orchestrator.start("concurrent"), timeout=20)
    assert state.status == "rolled_back", state.error
    # the two undos wait for each other (run one at a time they time out): concurrent
    assert sorted(log[-3:-1]) == ["undo charge", "undo notify"] and log[-1] == "undo reserve"
    assert {s.status for s in state.steps.values()} == {"compensated", "failed"}
    end = [event async for event in store.read(saga_stream(state.id))][-1].data
    # the last compensation's outcome is stored inside the rollback: one write
    assert isinstance(end, SagaRolledBack) and end.completed is not None
    assert (end.completed.step, end.completed.phase) == ("reserve", "compensation")


async def test_steps_of_a_group_take_their_own_locks_and_release_them_at_the_end(
    store: JetStreamEventStore,
) -> None:
    async with Orchestrator(store, [_shop(locks=True)]) as orchestrator:
        saga_id = await orchestrator.start("shop")
        state = await orchestrator.wait(saga_id, timeout=20)

        async def released() -> bool:
            return all([(await read_lock(store, r)).holder is None for r in ("till", "mail")])

        await wait_for(released, timeout=10)
    assert state.status == "committed"
    assert set(state.locks) == {"till", "mail"}


async def test_an_outcome_whose_claim_was_taken_over_is_refused_and_its_sibling_is_stored(
    store: JetStreamEventStore,
) -> None:
    """Two steps of one saga in flight: another instance takes one over (its lease, say, ran
    out while this one paused); this instance's late outcome for it is fenced off, the other
    step's outcome is stored, and the step taken over runs again once its new claim lapses."""
    gate = asyncio.Event()
    ran: list[str] = []
    saga = Saga("fenced")

    def gated(name: str) -> Any:
        async def run(ctx: StepContext) -> str:
            ran.append(f"{name}:{ctx.attempt}")
            await gate.wait()
            return name

        return run

    saga.step("b", group="g")(gated("b"))
    saga.step("c", group="g")(gated("c"))
    async with Orchestrator(store, [saga], name="mine") as orchestrator:
        saga_id = await orchestrator.start("fenced")

        async def both_running() -> bool:
            state = await read_saga(store, saga_id)
            return all(state.steps[s].status == "running" for s in "bc") and len(ran) == 2

        await wait_for(both_running, timeout=10)
        state = await read_saga(store, saga_id)
        thief = StepStarted(
            saga_id=saga_id,
            step="b",
            attempt=2,
            driver="thief",
            lease_until=datetime.now(UTC) + timedelta(seconds=0.5),
        )
        await store.append(saga_stream(saga_id), NewEvent(data=thief), state.version)
        gate.set()
        state = await orchestrator.wait(saga_id, timeout=20)
    assert state.status == "committed"
    assert orchestrator.fenced >= 1
    events = [event.data async for event in store.read(saga_stream(saga_id))]
    outcomes = [(o.step, o.attempt) for e in events for o in step_outcomes(e)]
    assert ("b", 1) not in outcomes and ("c", 1) in outcomes
    assert ("b", 3) in outcomes  # claimed again by `mine` once the thief's claim lapsed
    assert state.steps["b"].history[:2] == [
        "action attempt 1 claimed by mine",
        "action attempt 2 claimed by thief",
    ]


async def test_fuse_sagas_show_prints_the_groups(
    store: JetStreamEventStore, nats_url: str, prefix: str
) -> None:
    async with Orchestrator(store, [_shop()]) as orchestrator:
        await orchestrator.wait(await orchestrator.start("shop", saga_id="g-1"), timeout=20)

    def fuse(*args: str) -> str:
        return run_fuse("--nats", nats_url, "--prefix", prefix, "sagas", "show", *args).stdout

    table = await asyncio.to_thread(fuse, "g-1")
    assert "GROUP" in table and "group pay: charge, notify (run concurrently)" in table
    shown = json.loads(await asyncio.to_thread(fuse, "g-1", "--json"))
    assert set(shown) >= {"id", "status", "steps", "started_at", "ended_at", "transaction"}
    assert [(s["name"], s["group"]) for s in shown["steps"]] == [
        ("reserve", None),
        ("charge", "pay"),
        ("notify", "pay"),
        ("ship", None),
    ]


async def test_a_saga_started_without_groups_reads_as_before(store: JetStreamEventStore) -> None:
    """An older `saga.started` (no `groups`) folds into steps without a group."""
    started = SagaStarted(saga_id="old-1", name="shop", steps=["reserve"])
    await store.append(saga_stream("old-1"), NewEvent(data=started), NO_STREAM)
    state = await read_saga(store, "old-1")
    assert [(s.name, s.group) for s in state.steps.values()] == [("reserve", None)]


async def test_a_reviewed_step_of_a_group_waits_for_its_decision_while_the_others_run(
    store: JetStreamEventStore,
) -> None:
    """A group of a reviewed step and a plain one: the plain one runs (and completes) while
    the review is pending; once approved, the reviewed step runs with the reviewed input, and
    the step after the group sees both outputs."""
    ada = Reviewer("ada", ("ops",))
    log: list[str] = []
    saga = Saga("reviewed-group")

    @saga.step("ship", group="g", review=Review(group="ops"))
    async def ship(ctx: StepContext) -> str:
        log.append("ship")
        return f"shipped to {ctx.input['to']}"

    @saga.step("bill", group="g")
    async def bill(ctx: StepContext) -> str:
        log.append("bill")
        return "billed"

    @saga.step("close")
    async def close(ctx: StepContext) -> list[str]:
        return sorted(ctx.outputs)

    async with Orchestrator(store, [saga]) as orchestrator:
        saga_id = await orchestrator.start("reviewed-group", {"to": "lima"})
        review_id = reviews.review_id(saga_id, "ship")

        async def billed_and_pending() -> bool:
            state = await read_saga(store, saga_id)
            review = await reviews.read_review(store, review_id)
            return state.steps["bill"].status == "done" and review.requested

        await wait_for(billed_and_pending, timeout=20)
        assert log == ["bill"] and (await read_saga(store, saga_id)).status == "active"
        await reviews.edit(store, review_id, ada, {"to": "cusco"})
        await reviews.approve(store, review_id, ada)
        state = await orchestrator.wait(saga_id, timeout=20)
    assert state.status == "committed", state.error
    assert log == ["bill", "ship"]
    assert state.outputs["ship"] == "shipped to cusco"
    assert state.outputs["close"] == ["bill", "ship"]
