"""Replaying a past conversation with recorded model results (the same: no divergence, no model
called, nothing written) or with another model (divergence shown), and `fuse models usage`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import writer_agent
from messages import settled
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context
from newfuse.agents.models import ChatMessage
from newfuse.agents.models.usage import ModelCalls, usage
from newfuse.agents.replay import Replay, ReplayedMessage
from newfuse.nats import MessageStreamSpec, Subjects

HERE = Path(__file__).parent


def fuse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "newfuse", *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "250"},
        check=False,
    )


@pytest.fixture
async def conversation(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> AsyncIterator[list[dict[str, Any]]]:
    """Two requests to the writer in conversation `conv-r`, one in `conv-other`."""
    replies = []
    async with (
        writer_agent.writer.run(nc, key="1", prefix=prefix, stream=stream, fast_path=False),
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        for topic, context in (("tides", "conv-r"), ("moons", "conv-other"), ("orbits", "conv-r")):
            reply = await client.request("writer", "write", {"topic": topic}, context_id=context)
            replies.append(reply.payload)
        await settled(nc, prefix, "writer")
    yield replies


async def head(nc: Client, prefix: str) -> int:
    info = await nc.jetstream().stream_info(Subjects(prefix).message_stream_name)
    return int(info.state.last_seq)


async def replayed(nc: Client, prefix: str, agent: Agent, **options: Any) -> list[ReplayedMessage]:
    replay = Replay(nc, agent, prefix=prefix, **options)
    found = [message async for message in replay.messages("conv-r")]
    assert replay.skipped == []
    return found


async def test_a_replay_with_recorded_results_reproduces_the_log_and_calls_no_model(
    nc: Client, prefix: str, conversation: list[dict[str, Any]]
) -> None:
    assert conversation[0] == {"text": "review-1: draft-1: tides"}
    before, calls_before = await head(nc, prefix), len(writer_agent.answered)
    results = await replayed(nc, prefix, writer_agent.writer)
    assert [(r.type, r.diverged, r.error) for r in results] == [("write", False, None)] * 2
    assert len(writer_agent.answered) == calls_before  # every answer came from the log
    assert await head(nc, prefix) == before  # nothing was written
    first = results[0]
    assert [(c.call, c.diverged, c.reason) for c in first.calls] == [(0, False, ""), (1, False, "")]
    assert first.calls[1].replayed is not None
    assert first.calls[1].replayed.content == "review-1: draft-1: tides"
    assert first.calls[1].recorded is not None
    assert first.calls[1].replayed.input_hash == first.calls[1].recorded.input_hash
    assert sorted((e.type, e.change) for e in first.effects) == [
        ("a2a.message", "same"),
        ("a2a.message", "same"),
    ]
    addressees = sorted(e.subject.split(".", 2)[2].split(".")[0] for e in first.effects)
    assert addressees == ["_reply", "editor"]
    assert results[1].calls[0].recorded is not None
    assert results[1].calls[0].recorded.content == "draft-1: orbits"


async def test_a_replay_with_another_model_shows_where_it_diverges(
    nc: Client, prefix: str, conversation: list[dict[str, Any]]
) -> None:
    before = await head(nc, prefix)
    results = await replayed(nc, prefix, writer_agent.writer, model="draft-2")
    assert [r.diverged for r in results] == [True, True]
    first = results[0]
    assert first.calls[0].reason == "model draft-1 -> draft-2 and output differ"
    assert first.calls[0].replayed is not None
    assert first.calls[0].replayed.content == "draft-2: tides"
    # the second call got another input (the new draft): its input differs too
    assert first.calls[1].reason == "input and model review-1 -> draft-2 and output differ"
    changed = [e for e in first.effects if e.change == "changed"]
    assert len(changed) == 2  # the reply and the article both carry the new text
    assert {e.replayed["payload"]["text"] for e in changed} == {"draft-2: draft-2: tides"}
    assert {e.recorded["payload"]["text"] for e in changed} == {"review-1: draft-1: tides"}
    assert await head(nc, prefix) == before

    loud = await replayed(nc, prefix, writer_agent.writer, provider=writer_agent.loud)
    assert loud[0].calls[0].replayed is not None
    assert loud[0].calls[0].replayed.provider == "loud"
    assert loud[0].calls[0].reason == "output differ"
    assert loud[0].calls[0].replayed.content == "DRAFT-1: TIDES"


async def test_a_changed_prompt_is_answered_from_the_log_and_flagged(
    nc: Client, prefix: str, conversation: list[dict[str, Any]]
) -> None:
    changed = Agent("writer")

    @changed.handler("write")
    async def write(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
        draft = await ctx.chat(
            writer_agent.provider,
            [ChatMessage(role="user", content=f"Write about {body['topic']}")],
            model="draft-1",
        )
        return {"text": draft.content}

    results = await replayed(nc, prefix, changed)
    first = results[0]
    assert first.diverged
    assert [(c.call, c.reason) for c in first.calls] == [
        (0, "input differ"),
        (1, "not made by the replay"),
    ]
    assert first.calls[0].replayed is not None
    assert first.calls[0].replayed.content == "draft-1: tides"  # the recorded answer
    assert sorted(e.change for e in first.effects) == ["changed", "missing"]


async def test_fuse_agents_replay_prints_the_comparison(
    nats_url: str, prefix: str, conversation: list[dict[str, Any]]
) -> None:
    same = fuse(
        "--nats",
        nats_url,
        "--prefix",
        prefix,
        "agents",
        "replay",
        "writer_agent:writer",
        "--context",
        "conv-r",
        "--details",
    )
    assert same.returncode == 0, same.stderr
    rows = [line.split() for line in same.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[1:5] for row in rows] == [["write", "2", "2", "same"]] * 2
    assert "call 0: same" in same.stdout
    assert "2 message(s) replayed, 0 diverged from the log" in same.stderr

    other = fuse(
        "--nats",
        nats_url,
        "--prefix",
        prefix,
        "--json",
        "agents",
        "replay",
        "writer_agent:writer",
        "--context",
        "conv-r",
        "--provider",
        "writer_agent:loud",
    )
    assert other.returncode == 0, other.stderr
    lines = [json.loads(line) for line in other.stdout.splitlines()]
    assert [line["diverged"] for line in lines] == [True, True]
    assert lines[0]["calls"][0]["replayed"]["content"] == "DRAFT-1: TIDES"
    assert "2 message(s) replayed, 2 diverged from the log" in other.stderr

    table = fuse(
        "--nats",
        nats_url,
        "--prefix",
        prefix,
        "agents",
        "replay",
        "writer_agent:writer",
        "--context",
        "conv-r",
        "--model",
        "draft-2",
    )
    assert "diverged" in table.stdout
    assert (
        "call 0: model draft-1 -> draft-2 and output differ: draft-1: tides -> draft-2: tides"
        in table.stdout
    )

    bad = fuse(
        "--nats",
        nats_url,
        "--prefix",
        prefix,
        "agents",
        "replay",
        "writer_agent:writer",
        "--context",
        "conv-r",
        "--provider",
        "writer_agent:writer",
    )
    assert bad.returncode == 1
    assert "it is a Agent, not a model provider" in bad.stderr


async def test_usage_sums_calls_and_tokens_per_agent_and_model_version(
    nc: Client, nats_url: str, prefix: str, conversation: list[dict[str, Any]]
) -> None:
    # a hostile body on the records' subject is skipped, not fatal
    await nc.jetstream().publish(Subjects(prefix).models("writer"), b'{"not": "an envelope"')
    calls = ModelCalls(nc, prefix=prefix)
    records = [stored async for stored in calls.records()]
    assert len(records) == 6 and len(calls.skipped) == 1
    rows = usage(records)
    assert [(r.agent, r.request_model, r.calls, r.errors) for r in rows] == [
        ("writer", "draft-1", 3, 0),
        ("writer", "review-1", 3, 0),
    ]
    draft = rows[0]
    assert draft.response_model == "draft-1"
    assert draft.revision == writer_agent.provider.revision
    assert draft.input_tokens == 3  # one word per topic
    assert draft.output_tokens == 6  # "draft-1: <topic>"
    assert draft.latency_ms == pytest.approx(
        sum(s.invoked.latency_ms for s in records if s.invoked.request_model == "draft-1")
    )

    result = fuse("--nats", nats_url, "--prefix", prefix, "--json", "models", "usage")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(x["agent"], x["request_model"], x["calls"], x["output_tokens"]) for x in lines] == [
        ("writer", "draft-1", 3, 6),
        ("writer", "review-1", 3, 9),
    ]
    assert "skipped: position" in result.stderr
    one = fuse("--nats", nats_url, "--prefix", prefix, "models", "usage", "--context", "conv-r")
    assert one.returncode == 0, one.stderr
    assert "AGENT" in one.stdout and "REVISION" in one.stdout
    assert "4 call(s) in 2 row(s)" in one.stderr
    bad = fuse("--nats", nats_url, "--prefix", prefix, "models", "usage", "--agent", "_x")
    assert bad.returncode == 1 and "reserved" in bad.stderr
