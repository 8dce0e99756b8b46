"""The conversation read back from the message stream: `History` and `fuse agents history`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context
from newfuse.agents.history import History
from newfuse.nats import MessageStreamSpec, Subjects
from support import run_fuse, wait_for


async def test_a_conversation_replays_in_order_and_foreign_bodies_are_skipped_not_raised(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    echo = Agent("echo", max_attempts=1)
    echoed: list[str] = []

    @echo.handler("say")
    async def say(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("fail"):
            raise ValueError("cannot say that")
        ctx.publish("heard", "heard", {"text": body["text"]})
        echoed.append(body["text"])
        return {"text": body["text"].upper()}

    subjects = Subjects(prefix)
    async with (
        echo.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, sender="alice", stream=stream) as alice,
    ):
        reply = await alice.request("echo", "say", {"text": "hi"}, context_id="c1")
        assert reply.payload == {"text": "HI"}
        await alice.send("echo", "say", {"text": "elsewhere"}, context_id="c2")
        # a foreign client's bytes on an agent's subject, and a deep body: skipped, reported
        await nc.jetstream().publish(subjects.agent_type("echo"), b"\xff not json")
        await nc.jetstream().publish(subjects.agent_type("echo"), b"[" * 5000)
        await alice.send("echo", "say", {"text": "boom", "fail": True}, context_id="c1")

        async def settled() -> bool:
            return len(echoed) == 2 and running.dead_lettered == 3

        await wait_for(settled, timeout=20)

    history = History(nc, prefix=prefix)
    turns = [turn async for turn in history.turns(context_id="c1")]
    shapes = [(t.kind, t.sender, t.to, t.type) for t in turns]
    assert len(shapes) == 4, shapes
    assert shapes[0] == shapes[3] == ("message", "alice", "echo", "say")
    # the handler's two effects are published together: either may be stored first
    effects = sorted((t.kind, t.sender, t.type) for t in turns[1:3])
    assert effects == [("reply", "echo/1", "say.reply"), ("topic", "echo/1", "heard")]
    assert sorted(t.to.split()[0] for t in turns[1:3]) == ["#heard", "reply"]
    assert [t.position for t in turns] == sorted(t.position for t in turns)
    assert turns[0].text == '{"text":"hi"}'
    assert all(t.context_id == "c1" for t in turns)
    assert len(history.skipped) == 2, history.skipped  # the two foreign bodies, with positions
    assert all("position" in note for note in history.skipped)

    everything = [turn async for turn in history.turns()]
    assert {t.kind for t in everything} >= {"message", "topic", "reply", "dead-letter"}
    letters = [t for t in everything if t.kind == "dead-letter"]
    assert len(letters) == 3 and all(t.sender == "echo" for t in letters)
    assert any("cannot say that" in t.text for t in letters)
    assert [t async for t in history.turns(agent="nobody")] == []

    listed = await asyncio.to_thread(
        run_fuse,
        "--nats",
        nats_url,
        "--prefix",
        prefix,
        "agents",
        "history",
        "--json",
        "--context",
        "c1",
    )
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [line["position"] for line in lines] == [t.position for t in turns]
    assert set(lines[0]) == {
        "position",
        "time",
        "kind",
        "sender",
        "to",
        "type",
        "id",
        "context_id",
        "task_id",
        "text",
    }
    table = await asyncio.to_thread(
        run_fuse, "--nats", nats_url, "--prefix", prefix, "agents", "history", "--limit", "2"
    )
    assert table.stdout.splitlines()[0].split() == [
        "POS",
        "TIME",
        "KIND",
        "FROM",
        "TO",
        "TYPE",
        "TEXT",
    ]
    assert len(table.stdout.splitlines()) == 3
    assert "stopped at --limit 2" in table.stderr
