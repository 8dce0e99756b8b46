"""Result aggregation on a real server with real agents: all, first, quorum(2 of 3), deadline
with one slow agent (partial), a failing agent, late results recorded after the close, the
aggregate as a stored event that lists the replies it was built from."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, AgentId, Aggregates, Aggregator, Context
from newfuse.agents.history import History
from newfuse.errors import AggregateConfigError
from newfuse.nats import MessageStreamSpec
from support import run_fuse, wait_for

KEYS = ("1", "2", "3")
SOLVERS = [AgentId("solver", key) for key in KEYS]


class Solvers:
    """Three instances of `solver`; each answers once its gate is open (all open at first),
    instance `fails` answers with an error."""

    def __init__(self) -> None:
        self.gates = {key: asyncio.Event() for key in KEYS}
        for gate in self.gates.values():
            gate.set()
        self.fails: str | None = None
        self.handled: list[str] = []
        self.agent = Agent("solver", max_attempts=1, backoff=(0.01, 0.02))

        @self.agent.handler("solve")
        async def solve(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
            key = ctx._runtime.agent_id.key
            await self.gates[key].wait()
            self.handled.append(key)
            if key == self.fails:
                raise ValueError(f"solver {key} cannot")
            return {"answer": body["x"] * 2, "by": key}

    def hold(self, *keys: str) -> None:
        for key in keys:
            self.gates[key].clear()

    def release(self) -> None:
        for gate in self.gates.values():
            gate.set()


@pytest.fixture
async def solvers(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> AsyncIterator[tuple[Solvers, Aggregator]]:
    team = Solvers()
    async with contextlib.AsyncExitStack() as stack:
        for key in KEYS:
            await stack.enter_async_context(
                team.agent.run(nc, key=key, prefix=prefix, stream=stream)
            )
        client = await stack.enter_async_context(
            AgentClient(nc, prefix=prefix, stream=stream, sender="planner")
        )
        aggregator = await stack.enter_async_context(Aggregator(client))
        stack.callback(team.release)  # no handler left waiting when the agents stop
        yield team, aggregator


async def test_all_gathers_every_reply_and_stores_the_aggregate_listing_them(
    nc: Client, prefix: str, solvers: tuple[Solvers, Aggregator]
) -> None:
    _, aggregator = solvers
    gathered = await aggregator.scatter(SOLVERS, "solve", {"x": 21}, strategy="all", timeout=30)
    assert gathered.complete and gathered.missing == [] and gathered.failed == {}
    assert set(gathered.replies) == {"solver/1", "solver/2", "solver/3"}
    assert {r.payload["by"] for r in gathered.replies.values()} == set(KEYS)
    assert all(r.payload["answer"] == 42 for r in gathered.replies.values())

    record = await Aggregates(nc, prefix=prefix).get(gathered.aggregate_id)
    closed = record.closed
    assert closed is not None and record.closed_at == gathered.position
    assert (closed.strategy, closed.outcome, closed.context_id) == (
        "all",
        "complete",
        gathered.context_id,
    )
    assert closed.replies == [r.event_id for r in gathered.replies.values()]
    assert [a.agent for a in closed.asked] == ["solver/1", "solver/2", "solver/3"]
    assert record.late == [] and record.skipped == []


async def test_first_closes_on_one_reply_and_records_the_late_ones(
    nc: Client, nats_url: str, prefix: str, solvers: tuple[Solvers, Aggregator]
) -> None:
    team, aggregator = solvers
    team.hold("2", "3")
    gathered = await aggregator.scatter(SOLVERS, "solve", {"x": 1}, strategy="first", timeout=30)
    assert gathered.complete and list(gathered.replies) == ["solver/1"]
    assert gathered.missing == ["solver/2", "solver/3"]

    team.release()

    async def both_late() -> bool:
        return aggregator.late == 2

    await wait_for(both_late)
    record = await Aggregates(nc, prefix=prefix).get(gathered.aggregate_id)
    assert record.closed is not None and record.closed.missing == ["solver/2", "solver/3"]
    assert sorted(late.agent for late in record.late) == ["solver/2", "solver/3"]
    assert all(late.ok for late in record.late)
    asked = {a.agent: a.request_id for a in record.closed.asked}
    assert all(late.request_id == asked[late.agent] for late in record.late)

    # the late replies themselves are stored turns of the conversation, beside the aggregate
    turns = [t async for t in History(nc, prefix=prefix).turns(context_id=gathered.context_id)]
    replies = {t.id for t in turns if t.kind == "reply"}
    assert {late.reply for late in record.late} | set(record.closed.replies) == replies
    kinds = [(t.kind, t.type) for t in turns if t.kind == "aggregate"]
    assert kinds == [
        ("aggregate", "aggregate.closed"),
        ("aggregate", "aggregate.late"),
        ("aggregate", "aggregate.late"),
    ]
    closed_turn = next(t for t in turns if t.type == "aggregate.closed")
    assert closed_turn.sender == "planner"
    assert closed_turn.text == "first: complete; answered solver/1; missing solver/2, solver/3"

    # and `fuse agents history --context` finds them (off the loop: the agents keep running)
    printed = await asyncio.to_thread(
        run_fuse,
        *("--nats", nats_url, "--prefix", prefix, "--json", "agents", "history"),
        *("--context", gathered.context_id),
    )
    rows = [msgspec.json.decode(line) for line in printed.stdout.splitlines()]
    assert [row["type"] for row in rows if row["kind"] == "aggregate"] == [
        "aggregate.closed",
        "aggregate.late",
        "aggregate.late",
    ]
    assert sum(row["kind"] == "reply" for row in rows) == 3


async def test_quorum_two_of_three_closes_without_the_slow_one(
    nc: Client, prefix: str, solvers: tuple[Solvers, Aggregator]
) -> None:
    team, aggregator = solvers
    team.hold("3")
    gathered = await aggregator.scatter(
        SOLVERS, "solve", {"x": 5}, strategy="quorum", quorum=2, timeout=30
    )
    assert gathered.complete and set(gathered.replies) == {"solver/1", "solver/2"}
    assert gathered.missing == ["solver/3"] and gathered.quorum == 2
    record = await Aggregates(nc, prefix=prefix).get(gathered.aggregate_id)
    assert record.closed is not None
    assert (record.closed.strategy, record.closed.quorum) == ("quorum", 2)
    assert len(record.closed.replies) == 2


async def test_deadline_returns_partial_results_without_the_slow_agent(
    nc: Client, prefix: str, solvers: tuple[Solvers, Aggregator]
) -> None:
    team, aggregator = solvers
    team.hold("2")
    gathered = await aggregator.scatter(
        SOLVERS, "solve", {"x": 3}, strategy="deadline", timeout=1.5
    )
    assert gathered.outcome == "partial" and not gathered.complete
    assert set(gathered.replies) == {"solver/1", "solver/3"}
    assert gathered.missing == ["solver/2"]
    team.release()

    async def late() -> bool:
        return aggregator.late == 1

    await wait_for(late)
    record = await Aggregates(nc, prefix=prefix).get(gathered.aggregate_id)
    assert record.closed is not None and record.closed.outcome == "partial"
    assert [entry.agent for entry in record.late] == ["solver/2"]


async def test_a_quorum_that_failures_make_impossible_closes_at_once_as_incomplete(
    nc: Client, prefix: str, solvers: tuple[Solvers, Aggregator]
) -> None:
    team, aggregator = solvers
    team.fails = "1"
    team.hold("3")
    gathered = await aggregator.scatter(
        SOLVERS,
        "solve",
        {"x": 1},
        strategy="quorum",
        quorum=3,
        timeout=60,
    )
    assert gathered.outcome == "incomplete"
    assert (
        list(gathered.failed) == ["solver/1"] and "solver 1 cannot" in gathered.failed["solver/1"]
    )
    record = await Aggregates(nc, prefix=prefix).get(gathered.aggregate_id)
    assert record.closed is not None and record.closed.failed == ["solver/1"]
    assert len(record.closed.replies) == 2  # the error reply is listed too


@pytest.mark.parametrize(
    ("agents", "strategy", "quorum", "match"),
    [
        ([], "all", None, "at least one agent"),
        (["solver", "solver"], "all", None, "each agent once"),
        (["solver"], "most", None, "one of all, first, quorum, deadline"),
        (["solver"], "quorum", None, "quorum needs a number"),
        (["solver"], "quorum", 2, r"within 1\.\.1"),
        (["solver"], "first", 1, "only the quorum strategy"),
    ],
)
async def test_a_scatter_it_cannot_do_is_refused_before_anything_is_sent(
    solvers: tuple[Solvers, Aggregator],
    agents: list[str],
    strategy: Any,
    quorum: int | None,
    match: str,
) -> None:
    team, aggregator = solvers
    with pytest.raises(AggregateConfigError, match=match):
        await aggregator.scatter(agents, "solve", {"x": 1}, strategy=strategy, quorum=quorum)
    assert team.handled == []


async def test_foreign_bodies_on_an_aggregate_subject_are_skipped_and_named(
    nc: Client, prefix: str, solvers: tuple[Solvers, Aggregator]
) -> None:
    _, aggregator = solvers
    gathered = await aggregator.scatter(SOLVERS[:1], "solve", {"x": 1}, timeout=30)
    subject = aggregator.subjects.aggregate(gathered.aggregate_id)
    await nc.request(subject, b"not json at all", timeout=5)
    await nc.request(subject, b'{"id": "x", "type": "aggregate.closed"}', timeout=5)
    record = await Aggregates(nc, prefix=prefix).get(gathered.aggregate_id)
    assert record.closed is not None and record.closed.answered == ["solver/1"]
    assert len(record.skipped) == 2
    assert all(f"on {subject}" in reason for reason in record.skipped)
    history = History(nc, prefix=prefix)
    turns = [t async for t in history.turns(context_id=gathered.context_id)]
    assert [t.type for t in turns if t.kind == "aggregate"] == ["aggregate.closed"]
    assert len(history.skipped) == 2
