"""An agent's declared message policy, checked by the receiving runtime on a real server.

`coder` accepts `task.assign` and `review.request` from planners and `ping` from anyone. Its
runtime checks each message's sender (here the one it claims: the bus has no identities; see
tests/security/test_message_policy_secured.py for the signer) and type before the handler
runs: a denied message is not handled, is acked, answers a requester at once, and is counted
in a bounded `permission.denied` on the instance's own stream, which `fuse audit security`
lists.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context
from newfuse.agents.policy import MessagePolicy
from newfuse.agents.registry import stream_of
from newfuse.errors import AgentConfigError, MessageDeniedError, RequestFailedError
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import MessageStreamSpec, Subjects
from newfuse.schemas import PermissionDenied
from support import run_fuse, wait_for

POLICY = {"planner": ["task.assign", "review.request"], "*": ["ping"]}


def coder_agent(handled: list[tuple[str, str]]) -> Agent:
    coder = Agent("coder", accepts=POLICY)

    async def record(ctx: Context, body: dict[str, object]) -> dict[str, object]:
        handled.append((ctx.sender, ctx.message.type))
        return {"ok": True}

    for message_type in ("task.assign", "review.request", "ping", "deploy"):
        coder.handler(message_type)(record)
    return coder


async def denials(nc: Client, prefix: str, key: str) -> list[PermissionDenied]:
    """The permission.denied events on the coder instance's own stream."""
    store = JetStreamEventStore(nc, prefix=prefix)
    return [
        event.data
        async for event in store.read(stream_of("coder", key))
        if isinstance(event.data, PermissionDenied)
    ]


async def test_what_the_policy_accepts_is_handled_and_the_rest_is_denied_with_an_event(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    handled: list[tuple[str, str]] = []
    coder = coder_agent(handled)
    async with (
        coder.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream, sender="planner") as planner,
        AgentClient(nc, prefix=prefix, stream=stream, sender="stranger") as stranger,
    ):
        await planner.send("coder", "task.assign", {"n": 1})  # allowed
        await planner.send("coder", "deploy", {"n": 2})  # a type planners may not send
        await stranger.send("coder", "task.assign", {"n": 3})  # a sender type not declared
        await stranger.send("coder", "ping", {"n": 4})  # `*`: anyone may ping

        async def all_taken() -> bool:
            return running.handled + running.denied == 4

        await wait_for(all_taken)
        info = await nc.jetstream().consumer_info(stream.subjects.message_stream_name, "coder")
    assert sorted(handled) == [("planner", "task.assign"), ("stranger", "ping")]
    assert (running.handled, running.denied, running.dead_lettered) == (2, 2, 0)
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)  # acked, never redelivered
    events = await denials(nc, prefix, "1")
    subject = Subjects(prefix).agent_type("coder")
    assert sorted(
        (e.identity, e.operation, e.subject, e.message_type, e.count) for e in events
    ) == [
        ("planner", "send", subject, "deploy", 1),
        ("stranger", "send", subject, "task.assign", 1),
    ]
    assert {e.seen_by for e in events} == {"coder/1"}
    assert running.card.accepts == {
        "*": ["ping"],
        "planner": ["review.request", "task.assign"],
    }


async def test_a_denied_request_fails_at_once_naming_sender_type_and_receiver(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    coder = coder_agent([])
    async with (
        coder.run(nc, key="1", prefix=prefix, stream=stream),
        AgentClient(nc, prefix=prefix, stream=stream, sender="stranger") as stranger,
    ):
        # a timeout long enough that only the denial's answer can end the wait in a test's time
        with pytest.raises(MessageDeniedError) as through_log:
            await stranger.request("coder", "task.assign", {"n": 1}, timeout=120)
        with pytest.raises(MessageDeniedError) as fast:
            await stranger.call("coder", "task.assign", {"n": 2}, timeout=120)
        answered = await stranger.request("coder", "ping", {}, timeout=30)
    for denied in (through_log.value, fast.value):
        assert (denied.sender, denied.message_type, denied.receiver) == (
            "stranger",
            "task.assign",
            "coder",
        )
        assert isinstance(denied, RequestFailedError)  # who catches those catches this
        assert (
            "agent 'coder' failed 'task.assign': message denied: 'stranger' may not send "
            "'task.assign' (" in str(denied)
        )
        assert "from sender type 'stranger' it accepts ping" in str(denied)
    assert through_log.value.reply_id  # answered through the log, where it is kept
    assert answered.payload == {"ok": True}


async def test_a_flood_of_denied_messages_makes_a_bounded_number_of_events(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    coder = coder_agent([])
    flood = 1000
    async with AgentClient(nc, prefix=prefix, stream=stream, sender="mallory") as mallory:
        async with coder.run(nc, key="1", prefix=prefix, stream=stream) as running:
            for start in range(0, flood, 100):
                await asyncio.gather(
                    *(
                        mallory.send("coder", "task.assign", {"n": n})
                        for n in range(start, start + 100)
                    )
                )

            async def all_denied() -> bool:
                return running.denied == flood

            await wait_for(all_denied, timeout=60)
        # closed: the refusals counted since the first event are written out
    events = await denials(nc, prefix, "1")
    assert len(events) <= 2  # one at the first refusal, one for the rest within the window
    assert sum(e.count for e in events) == flood
    assert running.handled == 0


async def test_fuse_audit_security_lists_a_denied_message(
    nc: Client, prefix: str, stream: MessageStreamSpec, nats_url: str
) -> None:
    coder = coder_agent([])
    async with (
        coder.run(nc, key="7", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream, sender="stranger") as stranger,
    ):
        await stranger.send("coder", "review.request", {})

        async def denied() -> bool:
            return len(await denials(nc, prefix, "7")) == 1

        await wait_for(denied)
    assert running.denied == 1
    env = {**os.environ, "FUSE_NATS_URL": nats_url, "FUSE_PREFIX": prefix}
    rows = [
        json.loads(line)
        for line in run_fuse("audit", "security", "--json", env=env).stdout.splitlines()
    ]
    assert [(r["type"], r["stream"]) for r in rows] == [("permission.denied", "agent.coder-7")]
    assert rows[0]["data"]["identity"] == "stranger"
    assert rows[0]["data"]["messageType"] == "review.request"
    table = run_fuse("audit", "security", env=env).stdout
    inbox = Subjects(prefix).agent_type("coder")
    assert f"send review.request on {inbox} (1 time(s))" in table
    assert "coder/7" in table  # who saw it


async def test_without_a_policy_every_type_from_every_sender_is_handled(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    open_door = Agent("door")
    seen: list[str] = []

    @open_door.handler("anything")
    async def anything(ctx: Context, body: dict[str, object]) -> None:
        seen.append(ctx.sender)

    async with (
        open_door.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream, sender="whoever") as whoever,
    ):
        await whoever.send("door", "anything", {})

        async def handled() -> bool:
            return running.handled == 1

        await wait_for(handled)
    assert (seen, running.denied, running.card.accepts) == (["whoever"], 0, None)


def test_a_refusal_quotes_a_huge_claimed_sender_type_cut_short() -> None:
    policy = MessagePolicy("coder", {"planner": ["task.assign"]})
    refusal = policy.refusal("s" * 100_000)
    assert refusal.startswith(f"it accepts nothing from sender type {'s' * 64!r}... (100000 ")
    assert len(refusal) < 200


def test_an_empty_policy_accepts_nothing_and_a_wildcard_type_accepts_every_type() -> None:
    assert not MessagePolicy("coder", {}).allows("planner", "task.assign")
    everything = MessagePolicy("coder", {"planner": ["*"]})
    assert everything.allows("planner", "anything") and not everything.allows("coder", "x")
    assert MessagePolicy("coder", {"*": ["ping"]}).allows("anyone", "ping")


@pytest.mark.parametrize(
    ("accepts", "match"),
    [
        ({"planner": "task.assign"}, r"accepts\['planner'\]=.*give a list of message types"),
        ({"planner": [""]}, r"give a list of message types"),
        ({"planner/1": ["x"]}, r"a key is a sender's agent type or '\*'"),
    ],
)
def test_a_policy_that_cannot_be_meant_is_refused_when_the_agent_is_declared(
    accepts: dict[str, object], match: str
) -> None:
    with pytest.raises(AgentConfigError, match=match):
        Agent("coder", accepts=accepts)  # type: ignore[arg-type]
