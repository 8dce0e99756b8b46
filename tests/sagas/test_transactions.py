"""The `transactions` projection (core/transactions.py) on a real JetStream store and SQLite
file: live, its rows are the fold of each saga's stream; rebuilt, the same; hostile events on
saga streams are ignored or dead-lettered and the honest ones still projected; `fuse sagas`
reads it when built and folds the log otherwise, saying which."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from newfuse.cli.sagas import saga_json
from newfuse.core.orchestrator import Orchestrator, read_saga, saga_stream
from newfuse.core.saga import Saga, StepContext
from newfuse.core.transactions import (
    MAX_ROW_BYTES,
    NAME,
    VIEW,
    TransactionView,
    transactions_projection,
)
from newfuse.eventstore import NO_STREAM
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.projections import ProjectionRunner, SQLiteBatch, SQLiteReadModel, rebuild
from newfuse.schemas import (
    NewEvent,
    SagaCommitted,
    SagaStarted,
    StateUpdate,
    StepCompleted,
    StepStarted,
)
from support import run_fuse


def _travel(*, fail: str | None = None) -> Saga:
    """flight -> hotel -> car, each compensated; `fail` fails for good on its first try."""
    travel = Saga("travel")
    tries: Counter[str] = Counter()

    def action(name: str) -> Any:
        async def run(ctx: StepContext) -> dict[str, Any]:
            tries[name] += 1
            if name == fail or (name == "hotel" and tries[name] == 1):
                raise RuntimeError(f"{name} is full")  # the hotel once, then it has rooms
            return {"booked": name, "for": ctx.input.get("who")}

        return run

    async def undo(ctx: StepContext) -> None:
        return None

    for name in ("flight", "hotel", "car"):
        travel.step(name, attempts=2 if name == "hotel" else 1, backoff=0.01)(action(name))
        travel.compensate(name)(undo)
    return travel


async def _run_sagas(store: JetStreamEventStore) -> list[str]:
    """Three sagas through a real orchestrator: committed (after a hotel retry), rolled back
    (car fails), committed."""
    ids = []
    async with Orchestrator(store, [_travel(fail="car")]) as orchestrator:
        ids.append(await orchestrator.start("travel", {"who": "ada"}, saga_id="trip-1"))
        await orchestrator.wait(ids[-1], timeout=20)
    async with Orchestrator(store, [_travel()]) as orchestrator:
        for n in (2, 3):
            ids.append(await orchestrator.start("travel", {"who": "bo"}, saga_id=f"trip-{n}"))
            await orchestrator.wait(ids[-1], timeout=20)
    return ids


@pytest.fixture
async def model(tmp_path: Path) -> AsyncIterator[SQLiteReadModel]:
    async with await SQLiteReadModel.open(str(tmp_path / "audit.db")) as opened:
        yield opened


async def _logged(store: JetStreamEventStore, ids: list[str]) -> list[dict[str, Any]]:
    return [saga_json(await read_saga(store, saga_id)) for saga_id in ids]


async def test_the_live_projection_holds_each_sagas_fold_and_rebuild_makes_the_same(
    store: JetStreamEventStore, model: SQLiteReadModel, tmp_path: Path
) -> None:
    runner: ProjectionRunner[SQLiteBatch] = ProjectionRunner(
        transactions_projection(), store, model
    )
    async with runner:
        ids = await _run_sagas(store)
        head = await store.head_position()
        await runner.wait_until(head, timeout=20)
        async with await TransactionView.open(model.path) as view:
            progress = await view.progress()
            assert progress is not None and progress.checkpoint == head
            live = [saga_json(s) for s in await view.sagas()]
            assert live == await _logged(store, ids)  # the projection is the fold of the log
            assert [s["status"] for s in live] == ["rolled_back", "committed", "committed"]
            assert live[1]["steps"][1]["history"][1].startswith("action attempt 1 failed")
            assert [s.id for s in await view.sagas(status="committed", limit=1)] == ["trip-3"]
            one = await view.saga("trip-1")
            assert one is not None and one.transaction().status == "rolled_back"
            assert await view.saga("nope") is None
        with sqlite3.connect(model.path) as db:  # the SQL columns readers query
            rows = db.execute(
                f"SELECT id, transaction_status, failed_step, operations FROM {VIEW} ORDER BY id"
            ).fetchall()
        assert [r[:2] for r in rows] == [
            ("trip-1", "rolled_back"),
            ("trip-2", "committed"),
            ("trip-3", "committed"),
        ]
        assert rows[0][2] == "car"
        assert [op["status"] for op in json.loads(rows[0][3])] == ["compensated"] * 2 + ["failed"]

        generation = runner.generation
        result = await rebuild(transactions_projection(), store, model)
        assert result.new_generation != generation and result.dead_letters == 0
        async with await TransactionView.open(model.path) as view:
            assert [saga_json(s) for s in await view.sagas()] == live
            # the runner moved to the new generation and goes on folding there
            async with Orchestrator(store, [_travel()]) as orchestrator:
                await orchestrator.wait(await orchestrator.start("travel", saga_id="trip-4"))
            await runner.wait_until(await store.head_position(), timeout=20)
            after = await view.saga("trip-4")
            assert after is not None and after.status == "committed"


def _claim(saga_id: str) -> StepStarted:
    lease = datetime.now(UTC) + timedelta(seconds=5)
    return StepStarted(saga_id=saga_id, step="flight", attempt=1, driver="d", lease_until=lease)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def test_hostile_events_on_saga_streams_are_ignored_or_dead_lettered_and_nothing_stops(
    store: JetStreamEventStore, model: SQLiteReadModel, nc: nats.NATS, prefix: str
) -> None:
    runner: ProjectionRunner[SQLiteBatch] = ProjectionRunner(
        transactions_projection(), store, model
    )
    started = SagaStarted(saga_id="h1", name="travel", input={}, steps=["flight", "hotel"])
    await store.append(saga_stream("h1"), NewEvent(data=started), NO_STREAM)
    js = nc.jetstream()
    for body in (b"{not an envelope", b"[1,2,3]", b""):  # never an event: the store skips them
        await js.publish(f"{prefix}.ev.saga.h1", body)
    hostile = [
        NewEvent(type="saga.bogus", data={"sagaId": "h1"}),  # an unregistered type
        NewEvent(data=StateUpdate(agent_id="x", state={}, version=1)),  # not a saga event
        NewEvent(data=_claim("other")),
        NewEvent(data=StepCompleted(saga_id="h1", step="nowhere", attempt=1)),
        # an output that would make the row too large: a dead letter, the row stays
        NewEvent(
            data=StepCompleted(saga_id="h1", step="flight", attempt=1, output="x" * MAX_ROW_BYTES)
        ),
    ]
    await store.append(saga_stream("h1"), hostile)
    # a stream that never started, and one whose first event is a stranger's
    await store.append(saga_stream("h2"), NewEvent(data=SagaCommitted(saga_id="h2")))
    honest = [
        NewEvent(data=_claim("h1")),
        NewEvent(data=StepCompleted(saga_id="h1", step="flight", attempt=1, output="seat")),
    ]
    last = (await store.append(saga_stream("h1"), honest)).position
    async with runner:
        await runner.wait_until(last, timeout=20)
        assert runner.state == "running", runner.last_error
        letters = await model.dead_letters(NAME)
        assert [(d.event_type, d.stream) for d in letters] == [("saga.step_completed", "saga.h1")]
        assert "over the row's" in letters[0].error
        async with await TransactionView.open(model.path) as view:
            assert [s.id for s in await view.sagas()] == ["h1"]  # h2 never started
            state = await view.saga("h1")
    assert state is not None
    assert state.steps["flight"].status == "done" and state.steps["flight"].output == "seat"
    ignored = " | ".join(state.ignored)
    for why in ("not a saga event", "it names saga 'other'", "no step 'nowhere'"):
        assert why in ignored, (why, state.ignored)
    # what the log folds to, less the oversized output the row could not keep
    logged = await read_saga(store, "h1")
    assert logged.steps["flight"].output == "seat" and logged.version == state.version


def _sagas(nats_url: str, prefix: str, db: Path, *args: str, check: bool = True) -> Any:
    return run_fuse(
        "--nats", nats_url, "--prefix", prefix, "--audit-db", str(db), "sagas", *args, check=check
    )


async def test_fuse_sagas_reads_the_projection_when_built_and_folds_the_log_otherwise(
    store: JetStreamEventStore, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    ids = await _run_sagas(store)
    logged = await _logged(store, ids)
    db = tmp_path / "audit.db"

    async def from_the_log(why: str, refusal: str) -> None:
        """`list` folds the log and says `why`; `--source projection` refuses with `refusal`."""
        folded = await asyncio.to_thread(_sagas, nats_url, prefix, db, "list", "--json")
        assert f"source: the log ({why}" in folded.stderr
        assert [json.loads(line) for line in folded.stdout.splitlines()] == logged
        refused = await asyncio.to_thread(
            _sagas, nats_url, prefix, db, "list", "--source", "projection", check=False
        )
        assert refused.returncode != 0 and refusal in refused.stderr

    await from_the_log("no transactions projection to read", "no such file")
    async with await SQLiteReadModel.open(str(db)):  # a file with no `transactions` in it
        pass
    await from_the_log("no 'transactions' projection built", "no 'transactions' projection")

    async with await SQLiteReadModel.open(str(db)) as model:
        runner: ProjectionRunner[SQLiteBatch] = ProjectionRunner(
            transactions_projection(), store, model
        )
        async with runner:
            await runner.wait_until(await store.head_position(), timeout=20)
            listed = await asyncio.to_thread(_sagas, nats_url, prefix, db, "list", "--json")
            assert "source: projection 'transactions'" in listed.stderr
            assert "up to date with the log" in listed.stderr
            assert [json.loads(line) for line in listed.stdout.splitlines()] == logged
            table = await asyncio.to_thread(
                _sagas, nats_url, prefix, db, "list", "--status", "committed", "--limit", "1"
            )
            assert "trip-3" in table.stdout and "trip-2" not in table.stdout
            assert "--limit 1 cut the listing" in table.stderr
            shown = await asyncio.to_thread(
                _sagas, nats_url, prefix, db, "show", "trip-1", "--json"
            )
            assert json.loads(shown.stdout)["transaction"]["status"] == "rolled_back"
            assert "source: projection" in shown.stderr
        # stopped, with a saga it has not seen: it says how far behind it is
        started = SagaStarted(saga_id="late", name="travel", input={}, steps=["flight"])
        await store.append(saga_stream("late"), NewEvent(data=started), NO_STREAM)
        behind = await asyncio.to_thread(_sagas, nats_url, prefix, db, "list")
        assert "1 saga event(s) behind the log" in behind.stderr and "late" not in behind.stdout
        from_log = await asyncio.to_thread(_sagas, nats_url, prefix, db, "list", "--source", "log")
        assert "late" in from_log.stdout and "source: the log" in from_log.stderr
        # show falls back to the log for a saga the projection has not folded yet
        late = await asyncio.to_thread(_sagas, nats_url, prefix, db, "show", "late")
        assert "saga late (travel): active" in late.stdout
        assert "not in the projection (yet)" in late.stderr
    missing = await asyncio.to_thread(_sagas, nats_url, prefix, db, "show", "nope", check=False)
    assert missing.returncode != 0 and "no saga 'nope'" in missing.stderr


def test_a_row_decodes_back_into_the_fold_it_keeps() -> None:
    """The stored fold is SagaState as msgspec encodes it: another version's fields (a later
    SagaState) do not crash a reader, they are named (rebuild)."""
    from newfuse.core.transactions import decode_state
    from newfuse.errors import TransactionViewError

    with pytest.raises(TransactionViewError, match="rebuild the projection"):
        decode_state(msgspec.json.encode({"id": "a", "steps": 3}), saga_id="a", position=7)
