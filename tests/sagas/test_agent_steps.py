"""Saga steps that are agent requests or queued tasks (core/steps.py), on real agents, a real
worker and a real orchestrator: asked once per step phase, also across retries, re-drives and
copies stored after the message stream's duplicate window."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context, TaskContext, TaskQueue, Worker, wire
from newfuse.core import Orchestrator, Saga, StepContext, ask, enqueue
from newfuse.core.steps import task_id_of
from newfuse.errors import FuseError, RequestTimeoutError
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import DirectGet, MessageStreamSpec, Subjects, connect, ensure_event_stream
from newfuse.schemas import A2AMessage, A2AMetadata
from support import wait_for

WINDOW = 0.5
"""Seconds of this test's message stream's duplicate window."""


class Refused(FuseError):
    """An answer that retrying cannot change."""

    retryable = False


class Crash(Exception):
    """Stands for an orchestrator that died after the answer came, before it stored it."""


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(nats_url, name="agent-steps-test")
    yield client
    await client.close()


@pytest.fixture
async def stream(nc: Client, prefix: str) -> MessageStreamSpec:
    spec = MessageStreamSpec(subjects=Subjects(prefix), duplicate_window=WINDOW)
    await ensure_event_stream(nc, spec)
    return spec


@pytest.fixture
async def client(nc: Client, prefix: str, stream: MessageStreamSpec) -> AsyncIterator[AgentClient]:
    async with AgentClient(nc, prefix=prefix, stream=stream, sender="saga") as opened:
        yield opened


@pytest.fixture
async def queues(nc: Client, prefix: str, stream: MessageStreamSpec) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(nc, prefix=prefix, stream=stream, sender="saga") as opened:
        yield opened


def _pricer(asked: Counter[str]) -> Agent:
    pricer = Agent("pricer", backoff=(0.02, 0.1), max_attempts=2)

    @pricer.handler("price.quote")
    async def quote(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
        asked["quote"] += 1
        if body.get("item") == "unobtainium":
            raise Refused("no price for unobtainium")
        return {"item": body["item"], "price": 7 * body["qty"]}

    @pricer.handler("price.release")
    async def release(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
        asked["release"] += 1
        return {"released": body["item"]}

    return pricer


def _item(ctx: StepContext) -> dict[str, Any]:
    return {"item": ctx.input["item"], "qty": ctx.input.get("qty", 1)}


def _after_the_window(since: float) -> Any:
    async def passed() -> bool:
        return time.monotonic() > since + WINDOW + 0.1

    return passed


async def test_an_agent_answers_a_step_and_its_reply_feeds_the_next(
    store: JetStreamEventStore,
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    client: AgentClient,
) -> None:
    asked: Counter[str] = Counter()
    trip = Saga("priced")
    trip.step("quote", timeout=10)(ask(client, "pricer", "price.quote", _item))

    @trip.step("book")
    async def book(ctx: StepContext) -> str:
        return f"booked at {ctx.outputs['quote']['price']}"

    async with (
        _pricer(asked).run(nc, key="1", prefix=prefix, stream=stream),
        Orchestrator(store, [trip]) as orchestrator,
    ):
        saga_id = await orchestrator.start("priced", {"item": "tea", "qty": 3})
        state = await orchestrator.wait(saga_id, timeout=20)
    assert state.status == "committed", state.error
    assert state.outputs == {"quote": {"item": "tea", "price": 21}, "book": "booked at 21"}
    assert asked == {"quote": 1}


async def test_a_step_retried_after_its_answer_came_finds_it_and_does_not_ask_again(
    store: JetStreamEventStore,
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    client: AgentClient,
) -> None:
    """Attempt 1 gets the reply and dies before its outcome is stored; attempt 2 (through
    another client, as another orchestrator would) finds the same reply: the agent was asked
    once."""
    asked: Counter[str] = Counter()
    quote = ask(client, "pricer", "price.quote", _item)
    keys: list[str] = []
    saga = Saga("retried")

    @saga.step("quote", timeout=10, attempts=2, backoff=0.01)
    async def crashing_quote(ctx: StepContext) -> Any:
        keys.append(ctx.idempotency_key)
        if ctx.attempt == 1:
            await quote(ctx)
            raise Crash("died after the answer")
        async with AgentClient(nc, prefix=prefix, stream=stream, sender="other") as other:
            return await ask(other, "pricer", "price.quote", _item)(ctx)

    async with (
        _pricer(asked).run(nc, key="1", prefix=prefix, stream=stream) as agent,
        Orchestrator(store, [saga]) as orchestrator,
    ):
        state = await orchestrator.wait(await orchestrator.start("retried", {"item": "tea"}))
    assert state.status == "committed", state.error
    assert state.outputs["quote"] == {"item": "tea", "price": 7}
    assert len(keys) == 2 and len(set(keys)) == 1
    assert asked == {"quote": 1} and agent.handled == 1


async def test_a_request_stored_again_after_the_duplicate_window_is_handled_once(
    nc: Client, prefix: str, stream: MessageStreamSpec, client: AgentClient
) -> None:
    """No agent runs while a step asks twice, the second time after the duplicate window (two
    copies are stored); the agent then answers the first copy and skips the second."""
    asked: Counter[str] = Counter()
    body = {"item": "tea", "qty": 2}
    with pytest.raises(RequestTimeoutError, match="no reply from agent 'pricer'"):
        await client.request_once("pricer", "price.quote", body, key="s1/quote", timeout=0.2)
    sent = time.monotonic()
    await wait_for(_after_the_window(sent), timeout=5)
    with pytest.raises(RequestTimeoutError):
        await client.request_once("pricer", "price.quote", body, key="s1/quote", timeout=0.2)
    direct = DirectGet(nc, Subjects(prefix).message_stream_name, timeout=5.0)
    copies = [m async for m in direct.messages(Subjects(prefix).agent_type("pricer"), "copies", 1)]
    assert len(copies) == 2  # the window passed: the resend was stored again
    async with _pricer(asked).run(nc, key="1", prefix=prefix, stream=stream) as agent:
        reply = await client.request_once("pricer", "price.quote", body, key="s1/quote", timeout=10)

        async def both_taken() -> bool:
            return agent.handled + agent.already_handled == 2

        await wait_for(both_taken, timeout=10)
    assert reply.payload == {"item": "tea", "price": 14}
    assert asked == {"quote": 1}
    assert (agent.handled, agent.already_handled) == (1, 1)


async def test_an_agent_refusing_a_step_rolls_back_with_a_compensation_that_is_a_request(
    store: JetStreamEventStore,
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    client: AgentClient,
) -> None:
    asked: Counter[str] = Counter()
    saga = Saga("refused")

    @saga.step("hold")
    async def hold(ctx: StepContext) -> str:
        return "held"

    saga.compensate("hold")(ask(client, "pricer", "price.release", _item))
    saga.step("quote", attempts=3)(ask(client, "pricer", "price.quote", _item))
    async with (
        _pricer(asked).run(nc, key="1", prefix=prefix, stream=stream),
        Orchestrator(store, [saga]) as orchestrator,
    ):
        state = await orchestrator.wait(
            await orchestrator.start("refused", {"item": "unobtainium"}), timeout=20
        )
    assert state.status == "rolled_back"
    # the error answer fails the step for good: one attempt, the agent asked once
    assert state.steps["quote"].attempts == 1
    assert "RequestFailedError" in (state.error or "") and "unobtainium" in (state.error or "")
    assert state.steps["hold"].status == "compensated"
    assert asked == {"quote": 1, "release": 1}


async def test_a_queued_task_done_by_a_worker_is_a_step_submitted_once(
    store: JetStreamEventStore,
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    queues: TaskQueue,
) -> None:
    """Attempt 1 gets the task's result and dies before storing it; attempt 2 comes after the
    duplicate window, submits the same task id again, and is given the same result: the worker
    did the task once."""
    done: Counter[str] = Counter()

    async def pack(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
        done[ctx.task_id] += 1
        return {"parcel": f"{job['qty']} x {job['item']}"}

    packing = enqueue(queues, "packing", _item, priority=5)
    finished: list[float] = []
    saga = Saga("packed")

    @saga.step("pack", timeout=10, attempts=2, backoff=WINDOW + 0.2)
    async def crashing_pack(ctx: StepContext) -> Any:
        result = await packing(ctx)
        if ctx.attempt == 1:
            finished.append(time.monotonic())
            raise Crash("died after the result")
        assert time.monotonic() > finished[0] + WINDOW  # past the duplicate window
        return result

    worker = Worker("packing", pack, heartbeat=0.5, backoff=(0.02, 0.1))
    async with (
        worker.run(nc, key="1", prefix=prefix, stream=stream) as running,
        Orchestrator(store, [saga]) as orchestrator,
    ):
        saga_id = await orchestrator.start("packed", {"item": "tea", "qty": 4})
        state = await orchestrator.wait(saga_id, timeout=20)
    assert state.status == "committed", state.error
    assert state.outputs["pack"] == {"parcel": "4 x tea"}
    assert state.steps["pack"].attempts == 2
    assert list(done.values()) == [1] and running.handled == 1
    task = await queues.get(next(iter(done)))
    assert task is not None
    assert [s.state for s in task.statuses] == ["submitted", "working", "completed"]


async def test_a_queued_task_that_fails_fails_its_step_for_good(
    store: JetStreamEventStore,
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    queues: TaskQueue,
) -> None:
    async def broken(ctx: TaskContext, job: dict[str, Any]) -> None:
        raise Refused(f"cannot pack {job['item']}")

    saga = Saga("unpacked")
    saga.step("pack", timeout=10, attempts=3)(enqueue(queues, "packing", _item, max_attempts=1))
    worker = Worker("packing", broken, heartbeat=0.5, backoff=(0.02, 0.1))
    async with (
        worker.run(nc, key="1", prefix=prefix, stream=stream),
        Orchestrator(store, [saga]) as orchestrator,
    ):
        saga_id = await orchestrator.start("unpacked", {"item": "glass"})
        state = await orchestrator.wait(saga_id, timeout=20)
    assert state.status == "rolled_back"
    assert state.steps["pack"].attempts == 1
    assert "StepTaskFailedError" in (state.error or "") and "ended failed" in (state.error or "")
    assert "cannot pack glass" in (state.error or "")
    ctx = StepContext(saga_id=saga_id, step="pack", phase="action", attempt=1, input={}, outputs={})
    failed = await queues.get(task_id_of(ctx))
    assert failed is not None and failed.state == "failed"


async def test_ask_waits_no_longer_than_its_step(
    store: JetStreamEventStore, client: AgentClient
) -> None:
    """No agent answers: the step's own timeout ends each attempt, retryably."""
    saga = Saga("unanswered")
    saga.step("quote", timeout=0.3, attempts=2, backoff=0.01)(
        ask(client, "nobody", "price.quote", _item)
    )
    async with Orchestrator(store, [saga]) as orchestrator:
        state = await orchestrator.wait(
            await orchestrator.start("unanswered", {"item": "tea"}), timeout=20
        )
    assert state.status == "rolled_back"
    assert state.steps["quote"].attempts == 2
    assert state.error == "timed out after 0.3s"
    await asyncio.sleep(0)


async def test_junk_on_a_requests_reply_subject_is_not_taken_for_its_answer(
    nc: Client, prefix: str, stream: MessageStreamSpec, client: AgentClient
) -> None:
    """A body that is no message, and a message answering another request, sit on the reply
    subject of a request asked once: the client sends the request anyway, the runtime handles
    it, and the agent's own reply is the answer."""
    asked: Counter[str] = Counter()
    subjects = Subjects(prefix)
    message_id, token = wire.once_ids("s9/quote")
    assert token.startswith(wire.ONCE_PREFIX)
    replies = subjects.reply(token)
    await nc.publish(replies, b"\xff not json")
    stranger = A2AMessage(
        type="price.quote.reply",
        payload={"price": 0},
        metadata=A2AMetadata(sender="mallory"),
        message_id="m-1",
        in_reply_to="someone-else",
    )
    body, headers = wire.encode(f"reply.{token}", wire.MESSAGE_TYPE, stranger, event_id="m-1")
    await nc.publish(replies, body, headers=headers)
    direct = DirectGet(nc, subjects.message_stream_name, timeout=5.0)

    async def stored() -> bool:
        last = await direct.last_for(replies, "the stranger")
        return last is not None and last.data == body

    await wait_for(stored, timeout=5)
    async with _pricer(asked).run(nc, key="1", prefix=prefix, stream=stream) as agent:
        reply = await client.request_once(
            "pricer", "price.quote", {"item": "tea", "qty": 1}, key="s9/quote", timeout=10
        )
    assert reply.payload == {"item": "tea", "price": 7}
    assert reply.message is not None and reply.message.in_reply_to == message_id
    assert asked == {"quote": 1} and agent.handled == 1
