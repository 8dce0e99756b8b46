"""`fuse agents dead-letters`: listed, shown and replayed as a process; handled after replay."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context
from newfuse.nats import DirectGet, MessageStreamSpec, Subjects, headers
from support import run_fuse, wait_for


def _fuse(nats_url: str, prefix: str, *args: str, check: bool = True) -> Any:
    return asyncio.to_thread(run_fuse, "--nats", nats_url, "--prefix", prefix, *args, check=check)


async def test_dead_letters_are_listed_shown_and_replayed_once_then_handled(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    broken = True
    handled: list[tuple[int, str | None]] = []
    worker = Agent("worker", topics=("jobs",), max_attempts=2, backoff=(0.05, 0.1))

    @worker.handler("work")
    async def work(ctx: Context, body: dict[str, Any]) -> None:
        if broken:
            raise ValueError("the tool is down")
        handled.append((body["n"], ctx.message.message_id))

    subjects = Subjects(prefix)
    async with (
        worker.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        first = await client.send("worker", "work", {"n": 1})
        await client.publish("jobs", "work", {"n": 2})
        await nc.jetstream().publish(subjects.agent_type("worker"), b'{"not": "a message"}')

        async def all_dead() -> bool:
            return running.dead_lettered == 3

        await wait_for(all_dead, timeout=30)
        broken = False

        listed = await _fuse(nats_url, prefix, "agents", "dead-letters", "--json")
        letters = [json.loads(line) for line in listed.stdout.splitlines()]
        assert len(letters) == 3  # listed in the order they were written; here by message:
        letters.sort(key=lambda letter: letter["message_position"])
        assert [(x["message_type"], x["attempts"]) for x in letters] == [
            ("work", 2),
            ("work", 2),
            (None, 1),
        ]
        assert {x["agent"] for x in letters} == {"worker"}
        assert letters[0]["message_id"] == first
        assert letters[0]["error"] == "ValueError: the tool is down"
        assert letters[1]["subject"] == subjects.topic("jobs")
        assert letters[2]["error"].startswith("invalid envelope at position 3 on ")
        other = await _fuse(nats_url, prefix, "agents", "dead-letters", "--agent", "geo", "--json")
        assert other.stdout == ""
        table = await _fuse(nats_url, prefix, "agents", "dead-letters")
        assert "3 dead letter(s)" in table.stderr and "the tool is down" in table.stdout

        direct, topic, junk = (x["id"] for x in letters)
        shown = await _fuse(
            nats_url, prefix, "agents", "dead-letters", "show", direct[:13], "--json"
        )
        one = json.loads(shown.stdout)
        assert (one["id"], one["replayable"]) == (direct, None)
        assert (one["message"]["type"], one["message"]["payload"]) == ("work", {"n": 1})

        replayed = await _fuse(nats_url, prefix, "agents", "dead-letters", "replay", direct)
        assert f"replayed dead letter {direct}: message " in replayed.stdout
        again = await _fuse(nats_url, prefix, "agents", "dead-letters", "replay", direct, "--json")
        twice = json.loads(again.stdout)
        assert twice["already"] is True and twice["subject"] == subjects.agent_type("worker")
        # the topic's letter goes to its agent type's inbox, not to every subscriber again
        moved = await _fuse(nats_url, prefix, "agents", "dead-letters", "replay", topic, "--json")
        assert json.loads(moved.stdout)["subject"] == subjects.agent_type("worker")

        async def both_handled() -> bool:
            return sorted(n for n, _ in handled) == [1, 2]

        await wait_for(both_handled, timeout=30)
        assert running.dead_lettered == 3

        refused = await _fuse(
            nats_url, prefix, "agents", "dead-letters", "replay", junk, check=False
        )
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "it is not an A2A message, so there is nothing to send" in refused.stderr
        # not hex: no letter's id (a UUIDv5, random-looking) can start with it ("ffff" did,
        # once in about 20,000 runs)
        unknown = await _fuse(
            nats_url, prefix, "agents", "dead-letters", "show", "no-such-letter", check=False
        )
        assert unknown.returncode == 1
        assert "none of the 3 dead letters has that id" in unknown.stderr

    assert twice["message_id"] in {message_id for _, message_id in handled}
    direct_get = DirectGet(nc, subjects.message_stream_name, timeout=5.0)
    ids = [
        (msg.headers or {}).get(headers.MSG_ID)
        async for msg in direct_get.messages(subjects.agent_type("worker"), "test read")
    ]
    # the first letter, replayed twice, was stored once; the topic's once, in the type's inbox
    assert ids.count(twice["message_id"]) == 1
    assert ids.count(json.loads(moved.stdout)["message_id"]) == 1
    assert len(ids) == 1 + 1 + 2  # the message, the junk, two replays
