"""Exactly-once effects and request/reply on a real server."""

from __future__ import annotations

import asyncio
import time

import pytest
from messages import payload, settled, stored
from nats.aio.client import Client
from nats.aio.msg import Msg

from conftest import SHORT_WINDOW
from newfuse.agents import Agent, AgentClient, AgentId, Context, RunningAgent
from newfuse.errors import RequestFailedError, RequestTimeoutError
from newfuse.nats import MessageStreamSpec, Subjects
from support import wait_for


class LosesFirstAcks(RunningAgent):
    """An instance whose first ack of each message never reaches the server, as when its
    process dies between storing the effects and acking: the message comes back."""

    lost: set[int]

    async def _ack(self, msg: Msg) -> None:
        position = msg.metadata.sequence.stream
        if position not in self.lost:
            self.lost.add(position)
            return
        await super()._ack(msg)


def relay_agent(calls: list[int]) -> Agent:
    relay = Agent("relay", ack_wait=1.0)

    @relay.handler("order")
    async def order(ctx: Context, body: dict[str, int]) -> dict[str, int]:
        calls.append(body["n"])
        ctx.send("sink", "shipped", {"n": body["n"]})
        ctx.publish("audit", "seen", {"n": body["n"]})
        return {"n": body["n"]}

    return relay


async def test_a_redelivery_after_the_duplicate_window_emits_nothing_new(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    calls: list[int] = []
    relay = relay_agent(calls)
    running = relay.run(nc, key="1", prefix=prefix, stream=stream)
    instance = LosesFirstAcks(
        relay, nc, running.agent_id, running.subjects, stream, fast_path=False
    )
    instance.lost = set()
    subjects = Subjects(prefix)
    started = time.monotonic()
    async with instance, AgentClient(nc, prefix=prefix, stream=stream) as client:
        for n in range(5):
            await client.send("relay", "order", {"n": n})

        async def redelivered_and_acked() -> bool:  # ack_wait 1 s > the 0.5 s window
            info = await nc.jetstream().consumer_info(subjects.message_stream_name, "relay")
            return instance.already_handled == 5 and info.num_ack_pending == 0

        await wait_for(redelivered_and_acked, timeout=20)
    assert time.monotonic() - started > 2 * SHORT_WINDOW
    assert sorted(calls) == [0, 1, 2, 3, 4]  # redeliveries found the marker: no second call
    shipped = [
        payload(e).payload["n"] for e in await stored(nc, prefix, subjects.agent_type("sink"))
    ]
    seen = [payload(e).payload["n"] for e in await stored(nc, prefix, subjects.topic("audit"))]
    assert sorted(shipped) == sorted(seen) == [0, 1, 2, 3, 4]


async def test_two_deliveries_racing_on_one_message_store_its_effects_once(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    gate = asyncio.Event()
    calls: list[int] = []
    slow = Agent("slow", ack_wait=0.5)

    @slow.handler("work")
    async def work(ctx: Context, body: dict[str, int]) -> None:
        calls.append(ctx.attempt)
        ctx.send("sink", "done", {"attempt": ctx.attempt})
        if ctx.attempt == 1:
            await gate.wait()  # held past ack_wait: the server redelivers

    instance = slow.run(nc, key="1", prefix=prefix, stream=stream)
    instance._in_progress = _never  # type: ignore[method-assign]  # as a stalled process would
    async with instance, AgentClient(nc, prefix=prefix, stream=stream) as client:
        await client.send("slow", "work", {})

        async def second_done() -> bool:
            return calls == [1, 2] and instance.handled == 1

        await wait_for(second_done, timeout=20)
        await asyncio.sleep(2 * SHORT_WINDOW)  # the effect's id is no longer deduplicated
        gate.set()

        async def first_done() -> bool:
            return instance.already_handled == 1

        await wait_for(first_done, timeout=20)
    done = [
        payload(e).payload for e in await stored(nc, prefix, Subjects(prefix).agent_type("sink"))
    ]
    assert done == [{"attempt": 2}]  # the first found the marker and stored nothing


async def _never(msg: Msg) -> None:
    await asyncio.Event().wait()


async def test_a_request_through_the_log_gets_its_reply_correlated_and_stored(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    calls: list[int] = []
    async with (
        relay_agent(calls).run(nc, key="1", prefix=prefix, stream=stream),
        AgentClient(nc, prefix=prefix, stream=stream, sender="planner/1") as client,
    ):
        reply = await client.request("relay", "order", {"n": 7}, timeout=10)
        direct = await client.request(AgentId("relay", "1"), "order", {"n": 8}, timeout=10)
        await settled(nc, prefix, "relay")
        await settled(nc, prefix, "relay__1")
    assert (reply.type, reply.payload, direct.payload) == ("order.reply", {"n": 7}, {"n": 8})
    assert reply.message is not None and reply.message.in_reply_to
    (request,) = [
        e
        for e in await stored(nc, prefix, Subjects(prefix).agent_type("relay"))
        if e.id == reply.message.in_reply_to
    ]
    assert payload(request).metadata.sender == "planner/1"
    replies = await stored(nc, prefix, Subjects(prefix).reply(">"))
    assert [e.causation_id for e in replies] == [
        reply.message.in_reply_to,
        direct.message.in_reply_to,
    ]  # type: ignore[union-attr]


async def test_a_request_nobody_answers_times_out_naming_agent_type_and_time(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    async with AgentClient(nc, prefix=prefix, stream=stream) as client:
        with pytest.raises(
            RequestTimeoutError,
            match=r"no reply from agent 'nobody' to 'ping' within 0.3s \(through the log\)",
        ):
            await client.request("nobody", "ping", timeout=0.3)
        with pytest.raises(
            RequestTimeoutError, match=r"no reply from agent 'nobody' to 'ping' within 0.3s \(fast"
        ):
            await client.call("nobody", "ping", timeout=0.3)


async def test_a_request_the_agent_gives_up_on_fails_with_its_error_not_a_timeout(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    broken = Agent("broken", max_attempts=2, backoff=(0.05, 0.05))

    @broken.handler("ask")
    async def ask(ctx: Context, body: dict[str, object]) -> None:
        raise RuntimeError("no model configured")

    async with (
        broken.run(nc, key="1", prefix=prefix, stream=stream),
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        with pytest.raises(RequestFailedError, match="'broken' failed 'ask': RuntimeError: no"):
            await client.request("broken", "ask", timeout=10)
        with pytest.raises(RequestFailedError, match="RuntimeError: no model configured"):
            await client.call("broken", "ask", timeout=5)


async def test_the_fast_path_answers_over_core_nats_and_stores_no_request(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    calls: list[int] = []
    async with (
        relay_agent(calls).run(nc, key="1", prefix=prefix, stream=stream),
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        answers = await asyncio.gather(*(client.call("relay", "order", {"n": n}) for n in range(3)))
    assert sorted(a.payload["n"] for a in answers) == [0, 1, 2]
    subjects = Subjects(prefix)
    assert await stored(nc, prefix, subjects.agent_type("relay")) == []
    assert await stored(nc, prefix, subjects.reply(">")) == []
    shipped = await stored(nc, prefix, subjects.agent_type("sink"))  # its effects are stored
    assert sorted(payload(e).payload["n"] for e in shipped) == [0, 1, 2]


class FailsOnePublish(RunningAgent):
    """An instance whose publish of one effect fails once, as when its process dies with some
    effects stored and no marker: the redelivery must store only the missing ones."""

    failed = False

    async def _publish(self, subject: str, body: bytes, wire_headers: dict[str, str]) -> None:
        if not self.failed and b'"k":1' in body:
            self.failed = True
            raise ConnectionError("the process died here")
        await super()._publish(subject, body, wire_headers)


async def test_a_redelivery_after_some_effects_were_stored_stores_only_the_missing_ones(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    calls: list[int] = []
    fanout = Agent("fanout", backoff=(2 * SHORT_WINDOW, 2 * SHORT_WINDOW))  # past the window

    @fanout.handler("spread")
    async def spread(ctx: Context, body: dict[str, int]) -> None:
        calls.append(ctx.attempt)
        for k in range(3):
            ctx.send("sink", "part", {"k": k})

    running = fanout.run(nc, key="1", prefix=prefix, stream=stream)
    instance = FailsOnePublish(
        fanout, nc, running.agent_id, running.subjects, stream, fast_path=False
    )
    async with instance, AgentClient(nc, prefix=prefix, stream=stream) as client:
        await client.send("fanout", "spread", {})

        async def handled() -> bool:
            return instance.handled == 1

        await wait_for(handled, timeout=20)
    assert instance.failed and calls == [1, 2]
    parts = [
        payload(e).payload["k"]
        for e in await stored(nc, prefix, Subjects(prefix).agent_type("sink"))
    ]
    assert sorted(parts) == [0, 1, 2]
