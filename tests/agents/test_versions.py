"""Protocol versions and legacy shapes on a real server: raw V1/V2 publishes handled, versions
outside an agent's range refused with an error reply, hostile legacy bodies dead-lettered,
older minor versions upcast before the handler sees them."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from messages import payload, stored
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context
from newfuse.errors import RequestFailedError
from newfuse.nats import MessageStreamSpec, Subjects
from newfuse.schemas import A2AMessage, default_registry
from support import wait_for

SENT_MS = 1_767_323_045_123


class Task(msgspec.Struct, frozen=True):
    task: str


async def test_raw_v1_and_v2_json_published_to_an_agent_are_handled_with_payload_and_sender(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    seen: list[tuple[str, str, Any, dict[str, str], str]] = []
    worker = Agent("worker")

    @worker.handler("task.request")
    async def task(ctx: Context, body: Task) -> None:
        seen.append((ctx.message.type, ctx.sender, body, ctx.envelope.metadata, ctx.envelope.id))

    @worker.handler("query")
    async def query(ctx: Context, body: dict[str, Any]) -> None:
        seen.append((ctx.message.type, ctx.sender, body, ctx.envelope.metadata, ctx.envelope.id))

    v1 = {
        "id": "v1-1",
        "type": "TASK_REQUEST",
        "timestamp": SENT_MS,
        "sender": "old-planner",
        "payload": {"task": "index the docs"},
        "metadata": {"priority": "high", "timeout": 5000, "protocol_version": "1.0"},
    }
    v2 = {
        "header": {
            "id": "v2-1",
            "type": "QUERY",
            "version": "2.0",
            "priority": "medium",
            "source": "old-scout",
            "target": "worker",
        },
        "body": {"content": {"q": "status"}, "metadata": {"sent_at": SENT_MS, "retries": 1}},
    }
    js = nc.jetstream()
    subject = Subjects(prefix).agent_type("worker")
    async with worker.run(nc, key="1", prefix=prefix, stream=stream) as running:
        for message in (v1, v2):
            await js.publish(subject, msgspec.json.encode(message))  # no envelope, no headers

        async def both() -> bool:
            return len(seen) == 2

        await wait_for(both)
    assert running.dead_lettered == 0 and running.handled == 2
    by_type = {entry[0]: entry for entry in seen}
    _, sender, body, metadata, message_id = by_type["task.request"]
    assert (sender, body, message_id) == ("old-planner", Task("index the docs"), "v1-1")
    assert metadata["legacy.shape"] == "v1" and metadata["legacy.priority"] == "high"
    _, sender, body, metadata, message_id = by_type["query"]
    assert (sender, body, message_id) == ("old-scout", {"q": "status"}, "v2-1")
    assert metadata["legacy.version"] == "2.0" and metadata["legacy.target"] == "worker"


async def test_a_request_outside_the_agents_range_gets_an_error_reply_naming_both_versions(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    ran: list[str] = []
    picky = Agent("picky", protocols=">=1.1,<2.0")

    @picky.handler("greet")
    async def greet(ctx: Context, body: dict[str, Any]) -> dict[str, str]:
        ran.append(ctx.envelope.id)
        return {"hello": "there"}

    async with (
        picky.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,  # sends protocol 1.0
    ):
        with pytest.raises(
            RequestFailedError,
            match=r"agent 'picky' failed 'greet': protocol_version '1.0' of the message at "
            r"position \d+ on .*: it is outside the range this agent accepts; this agent "
            r"accepts '>=1.1,<2.0'",
        ):
            await client.request("picky", "greet", {"name": "Ada"}, timeout=20)
        with pytest.raises(RequestFailedError, match=r"ProtocolVersionError: .*'>=1.1,<2.0'"):
            await client.call("picky", "greet", {"name": "Ada"})  # the fast path too
    assert ran == [] and running.handled == 0 and running.dead_lettered == 1
    subjects = Subjects(prefix)
    (letter,) = [payload(e) for e in await stored(nc, prefix, subjects.dead_letters("picky"))]
    assert letter.message_type == "greet" and letter.attempts == 1
    assert "'1.0'" in letter.error and "'>=1.1,<2.0'" in letter.error
    (reply,) = [payload(e) for e in await stored(nc, prefix, subjects.reply(">"))]
    assert reply.type == "greet.error"
    assert reply.payload["protocol_version"] == "1.0"
    assert reply.payload["accepted"] == ">=1.1,<2.0"


async def test_hostile_legacy_bodies_are_dead_lettered_and_the_agent_keeps_handling(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    got: list[str] = []
    sturdy = Agent("sturdy")

    @sturdy.handler("task.request")
    async def task(ctx: Context, body: dict[str, Any]) -> None:
        got.append(ctx.envelope.id)

    deep: Any = 1
    for _ in range(500):
        deep = {"d": deep}
    good = {"id": "ok-1", "type": "TASK_REQUEST", "timestamp": SENT_MS, "sender": "s"}
    hostile = [
        good | {"sender": 42},
        good | {"timestamp": "soon"},
        good | {"payload": deep},
        good | {"metadata": {"protocol_version": "1.x"}},
        good | {"metadata": {"protocol_version": "9.0"}, "id": "v9"},
        {"header": {"id": "h", "type": "QUERY", "source": "s"}, "body": {"metadata": {}}},
        {"header": {"id": "h", "type": 7, "version": "2", "source": "s"}, "body": []},
    ]
    js = nc.jetstream()
    subject = Subjects(prefix).agent_type("sturdy")
    async with sturdy.run(nc, key="1", prefix=prefix, stream=stream) as running:
        positions = [(await js.publish(subject, msgspec.json.encode(h))).seq for h in hostile]
        await js.publish(subject, msgspec.json.encode(good))

        async def done() -> bool:
            return got == ["ok-1"] and running.dead_lettered == len(hostile)

        await wait_for(done)
    stored_letters = await stored(nc, prefix, Subjects(prefix).dead_letters("sturdy"))
    # handlers run concurrently, so letters are stored in any order: read them by position
    letters = sorted((payload(e) for e in stored_letters), key=lambda d: d.position)
    assert [d.position for d in letters] == positions
    errors = [d.error for d in letters]
    assert "at $.sender: legacy V1 message" in errors[0]
    assert "at $.timestamp: legacy V1 message" in errors[1]
    assert "the body nests" in errors[2]
    assert "protocol_version '1.x'" in errors[3] and "not a semantic version" in errors[3]
    assert "protocol_version '9.0'" in errors[4] and "'>=1.0,<2.0'" in errors[4]
    assert letters[4].message_id == "v9" and letters[4].message_type == "task.request"
    assert "at $.header.version: legacy V2 message" in errors[5]
    assert "legacy V2 message" in errors[6]
    assert all(d.attempts == 1 for d in letters)  # refused once, never retried


class GreetingV11(A2AMessage, frozen=True, kw_only=True, omit_defaults=True):
    """Protocol 1.1 of these tests: the priority is the message's, no longer the payload's."""

    priority: str


async def test_older_minor_versions_are_upcast_so_the_handler_sees_the_current_shape(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    registry = default_registry()
    registry.add("a2a.message", 2, GreetingV11)

    @registry.upcaster("a2a.message", 1)
    def to_1_1(v1: dict[str, Any]) -> dict[str, Any]:
        body = dict(v1["payload"])
        priority = body.pop("priority", "normal")
        metadata = v1["metadata"] | {"protocol_version": "1.1"}
        return v1 | {"payload": body, "priority": priority, "metadata": metadata}

    seen: list[tuple[str, str, dict[str, Any], str]] = []
    modern = Agent("modern", registry=registry)

    @modern.handler("task.request")
    async def task(ctx: Context, body: dict[str, Any]) -> None:
        message = ctx.message
        assert isinstance(message, GreetingV11)
        seen.append((ctx.envelope.id, message.priority, body, message.metadata.protocol_version))

    legacy_v1 = {
        "id": "legacy-1",
        "type": "TASK_REQUEST",
        "timestamp": SENT_MS,
        "sender": "old",
        "payload": {"task": "t2", "priority": "low"},
        "metadata": {"protocol_version": "1.0"},
    }
    async with (
        modern.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,  # a 1.0 sender
    ):
        sent = await client.send("modern", "task.request", {"task": "t1", "priority": "high"})
        await nc.jetstream().publish(
            Subjects(prefix).agent_type("modern"), msgspec.json.encode(legacy_v1)
        )

        async def both() -> bool:
            return len(seen) == 2

        await wait_for(both)
    assert running.dead_lettered == 0
    assert {entry[0]: entry[1:] for entry in seen} == {
        "legacy-1": ("low", {"task": "t2"}, "1.1"),
        sent: ("high", {"task": "t1"}, "1.1"),
    }
