"""Replaying a queue worker's handling of past tasks from the log: recorded model answers, the
result as the `completed` status, compared with what its worker stored (and `fuse agents
replay` on a Worker)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import summary_worker
from messages import settled
from nats.aio.client import Client
from test_model_replay import fuse, head

from newfuse.agents import TaskQueue
from newfuse.agents.queues import consumer_name
from newfuse.agents.replay import Replay, ReplayedMessage
from newfuse.nats import MessageStreamSpec


@pytest.fixture
async def handled(nc: Client, prefix: str, stream: MessageStreamSpec) -> AsyncIterator[list[str]]:
    """Three tasks the summaries worker completed: plain, retried once (flaky), in a context."""
    summary_worker.answered.clear()
    async with (
        summary_worker.summaries.run(nc, key="1", prefix=prefix, stream=stream),
        TaskQueue(nc, prefix=prefix, stream=stream) as queue,
    ):
        ids = [
            await queue.submit("summaries", {"text": "tides"}, priority=3),
            await queue.submit("summaries", {"text": "orbits", "flaky": True}),
            await queue.submit("summaries", {"text": "moons"}, context_id="conv-q"),
        ]
        for task_id in ids:
            assert (await queue.wait(task_id, timeout=30)).state == "completed"
        for priority in (0, 3):
            await settled(nc, prefix, consumer_name("summaries", priority))
    yield ids


async def replayed(nc: Client, prefix: str, **options: object) -> list[ReplayedMessage]:
    task_id = options.pop("task_id", None)
    context_id = options.pop("context_id", None)
    replay = Replay(nc, summary_worker.summaries, prefix=prefix, **options)  # type: ignore[arg-type]
    found = [m async for m in replay.messages(context_id, task_id=task_id)]  # type: ignore[arg-type]
    assert replay.skipped == []
    return found


async def test_a_task_replays_from_its_recorded_answer_to_the_same_completed_status(
    nc: Client, prefix: str, handled: list[str]
) -> None:
    before, calls = await head(nc, prefix), len(summary_worker.answered)
    [one] = await replayed(nc, prefix, task_id=handled[0])
    assert not one.diverged, one
    assert one.consumer == consumer_name("summaries", 3)
    assert [c.recorded.content for c in one.calls if c.recorded] == ["sum-1: tides"]
    assert sorted((e.type, e.change) for e in one.effects) == [
        ("a2a.message", "same"),  # the topic message it published
        ("task.status", "same"),  # completed, with the result artifact
    ]
    completed = next(e for e in one.effects if e.type == "task.status")
    assert completed.replayed["state"] == "completed"
    artifact = completed.replayed["artifacts"][0]["parts"][0]["data"]
    assert artifact == {"summary": "sum-1: tides", "priority": 3}
    assert len(summary_worker.answered) == calls  # no model was called
    assert await head(nc, prefix) == before  # nothing was written


async def test_a_retried_task_replays_the_attempt_that_completed_it(
    nc: Client, prefix: str, handled: list[str]
) -> None:
    flaky = handled[1]
    assert summary_worker.answered.count("sum-1") == 3  # the retry got its recorded answer
    [one] = await replayed(nc, prefix, task_id=flaky)
    assert not one.diverged, one
    assert len(one.calls) == 1 and one.calls[0].recorded is not None


async def test_another_model_shows_where_the_tasks_result_diverges(
    nc: Client, prefix: str, handled: list[str]
) -> None:
    [one] = await replayed(nc, prefix, context_id="conv-q", model="sum-2")
    assert one.diverged
    assert one.calls[0].reason.startswith("model sum-1 -> sum-2")
    completed = next(e for e in one.effects if e.type == "task.status")
    assert completed.change == "changed"
    assert completed.recorded["artifacts"][0]["parts"][0]["data"]["summary"] == "sum-1: moons"
    assert completed.replayed["artifacts"][0]["parts"][0]["data"]["summary"] == "sum-2: moons"


async def test_fuse_agents_replay_takes_a_worker_and_a_task(
    nats_url: str, prefix: str, handled: list[str]
) -> None:
    common = ("--nats", nats_url, "--prefix", prefix)
    same = fuse(*common, "agents", "replay", "summary_worker:summaries", "--task", handled[0])
    assert same.returncode == 0, same.stderr
    rows = [line.split() for line in same.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[1:5] for row in rows] == [["queue.task", "1", "2", "same"]]
    assert "1 message(s) replayed, 0 diverged from the log" in same.stderr
    other = fuse(
        *common,
        "--json",
        "agents",
        "replay",
        "summary_worker:summaries",
        "--context",
        "conv-q",
        "--model",
        "sum-2",
    )
    assert other.returncode == 0, other.stderr
    assert [json.loads(line)["diverged"] for line in other.stdout.splitlines()] == [True]
    neither = fuse(*common, "agents", "replay", "summary_worker:summaries")
    assert neither.returncode != 0
    assert "--context ID" in neither.stderr and "--task ID" in neither.stderr
