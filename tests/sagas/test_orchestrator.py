"""Sagas driven by real orchestrators on a real JetStream store."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from newfuse.core.orchestrator import Orchestrator, read_saga, saga_stream
from newfuse.core.saga import Saga, StepContext
from newfuse.eventstore.jetstream import JetStreamEventStore
from support import run_fuse, wait_for


def _travel(log: list[str], *, fail: str | None = None, fail_times: int = 99) -> Saga:
    """flight -> hotel -> car; `fail` fails `fail_times` times (then succeeds)."""
    travel = Saga("travel")
    failures: Counter[str] = Counter()

    def action(name: str) -> Any:
        async def run(ctx: StepContext) -> dict[str, Any]:
            log.append(f"{name}:{ctx.attempt}")
            if name == fail and failures[name] < fail_times:
                failures[name] += 1
                raise RuntimeError(f"{name} is full")
            return {"booked": name, "seen": sorted(ctx.outputs), "for": ctx.input.get("who")}

        return run

    def undo(name: str) -> Any:
        async def run(ctx: StepContext) -> None:
            log.append(f"undo {name}")

        return run

    for name in ("flight", "hotel", "car"):
        travel.step(name, attempts=2, backoff=0.05)(action(name))
        travel.compensate(name)(undo(name))
    return travel


async def test_a_saga_commits_each_step_feeding_the_next_and_its_transaction_says_so(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    async with Orchestrator(store, [_travel(log)]) as orchestrator:
        saga_id = await orchestrator.start("travel", {"who": "ada"})
        state = await orchestrator.wait(saga_id, timeout=20)
    assert state.status == "committed"
    assert log == ["flight:1", "hotel:1", "car:1"]
    assert state.outputs["car"] == {"booked": "car", "seen": ["flight", "hotel"], "for": "ada"}
    events = [event async for event in store.read(saga_stream(saga_id))]
    types = [event.type for event in events]
    # the last outcome is stored inside the commit: the two are one write
    assert types[-2:] == ["saga.step_started", "saga.committed"]
    assert events[-1].data.completed.step == "car"
    assert types.count("saga.step_started") == 3
    transaction = state.transaction()
    assert transaction.status == "committed" and transaction.id == saga_id
    assert [op["step"] for op in transaction.operations] == ["flight", "hotel", "car"]


async def test_a_failing_step_is_retried_then_the_completed_steps_are_compensated_newest_first(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    async with Orchestrator(store, [_travel(log, fail="car")]) as orchestrator:
        saga_id = await orchestrator.start("travel")
        state = await orchestrator.wait(saga_id, timeout=20)
    assert state.status == "rolled_back"
    assert log == ["flight:1", "hotel:1", "car:1", "car:2", "undo hotel", "undo flight"]
    assert (state.failed_step, state.error) == ("car", "RuntimeError: car is full")
    assert state.transaction().status == "rolled_back"


async def test_a_step_that_fails_once_succeeds_on_its_retry(store: JetStreamEventStore) -> None:
    log: list[str] = []
    async with Orchestrator(store, [_travel(log, fail="hotel", fail_times=1)]) as orchestrator:
        state = await orchestrator.wait(await orchestrator.start("travel"), timeout=20)
    assert state.status == "committed"
    assert log == ["flight:1", "hotel:1", "hotel:2", "car:1"]


async def test_a_step_past_its_timeout_fails_and_a_compensation_that_keeps_failing_sticks(
    store: JetStreamEventStore,
) -> None:
    stuck = Saga("stuck")

    @stuck.step("pay", timeout=5)
    async def pay(ctx: StepContext) -> str:
        return "paid"

    @stuck.compensate("pay", attempts=2)
    async def refund(ctx: StepContext) -> None:
        raise RuntimeError("the bank is down")

    @stuck.step("deliver", timeout=0.2, attempts=1)
    async def deliver(ctx: StepContext) -> None:
        await asyncio.sleep(10)

    async with Orchestrator(store, [stuck]) as orchestrator:
        state = await orchestrator.wait(await orchestrator.start(stuck), timeout=30)
    assert state.status == "stuck"
    assert state.steps["deliver"].error == "timed out after 0.2s"
    assert state.steps["pay"].status == "stuck"
    assert "the bank is down" in (state.error or "")
    assert state.transaction().status == "active"  # a person resolves it


async def test_two_orchestrators_share_the_sagas_and_each_step_runs_once(
    store: JetStreamEventStore,
) -> None:
    ran: Counter[str] = Counter()
    counting = Saga("counting")
    for name in ("a", "b", "c"):

        async def step(ctx: StepContext) -> None:
            ran[ctx.idempotency_key] += 1
            await asyncio.sleep(0.01)

        counting.step(name)(step)
    async with (
        Orchestrator(store, [counting], name="one") as one,
        Orchestrator(store, [counting], name="two") as two,
    ):
        ids = [await (one if i % 2 else two).start("counting") for i in range(30)]
        states = [await one.wait(saga_id, timeout=30) for saga_id in ids]
    assert {state.status for state in states} == {"committed"}
    assert len(ran) == 90 and set(ran.values()) == {1}, ran.most_common(3)
    assert one.runs + two.runs == 90
    assert one.runs > 0 and two.runs > 0
    print(f"\none ran {one.runs} steps, two {two.runs}; fenced writes {one.fenced + two.fenced}")


async def test_a_saga_started_by_an_instance_that_stopped_is_finished_by_the_next(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    slow = _travel(log)
    slow.get("hotel").timeout = 0.5
    first = Orchestrator(store, [slow], name="first")
    async with first:
        saga_id = await first.start("travel")

        async def hotel_started() -> bool:
            return "hotel:1" in log

        await wait_for(hotel_started, timeout=20)
    # `first` stopped with its claim on hotel held: the next run waits the lease, then claims
    state = await read_saga(store, saga_id)
    assert state.steps["hotel"].status in ("running", "done")
    async with Orchestrator(store, [slow], name="second") as second:
        state = await second.wait(saga_id, timeout=20)
    assert state.status == "committed"
    assert log.count("flight:1") == 1 and log[-1].startswith("car")


async def test_fuse_sagas_lists_and_shows_them_as_transactions(
    store: JetStreamEventStore, nats_url: str, prefix: str
) -> None:
    log: list[str] = []
    async with Orchestrator(store, [_travel(log, fail="car")]) as orchestrator:
        failed = await orchestrator.start("travel", saga_id="trip-1")
        await orchestrator.wait(failed, timeout=20)
    async with Orchestrator(store, [_travel(log)]) as orchestrator:
        await orchestrator.wait(await orchestrator.start("travel", saga_id="trip-2"), timeout=20)

    def fuse(*args: str) -> Any:
        return run_fuse("--nats", nats_url, "--prefix", prefix, "sagas", *args)

    listed = [
        json.loads(line)
        for line in (await asyncio.to_thread(fuse, "list", "--json")).stdout.splitlines()
    ]
    assert [(s["id"], s["status"]) for s in listed] == [
        ("trip-1", "rolled_back"),
        ("trip-2", "committed"),
    ]
    assert set(listed[0]) >= {"id", "status", "steps", "started_at", "ended_at"}
    assert [s["status"] for s in listed[0]["steps"]] == ["compensated", "compensated", "failed"]
    only = (await asyncio.to_thread(fuse, "list", "--status", "committed")).stdout
    assert "trip-2" in only and "trip-1" not in only
    shown = json.loads((await asyncio.to_thread(fuse, "show", "trip-1", "--json")).stdout)
    assert shown["transaction"]["status"] == "rolled_back"
    assert shown["failed_step"] == "car"
    table = (await asyncio.to_thread(fuse, "show", "trip-2")).stdout
    assert "saga trip-2 (travel): committed" in table
    missing = await asyncio.to_thread(
        run_fuse, "--nats", nats_url, "--prefix", prefix, "sagas", "show", "nope", check=False
    )
    assert missing.returncode != 0 and "no saga 'nope'" in missing.stderr
