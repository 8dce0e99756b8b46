"""Work queues: one worker per task, priorities with aging, cancel, deadlines, attempts, listing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from messages import payload, settled, stored
from nats.aio.client import Client

from newfuse.agents import RunningWorker, Task, TaskContext, TaskQueue, Worker, queue_stats, wire
from newfuse.agents.queues import consumer_name
from newfuse.errors import AgentConfigError, InvalidNameError, TaskSubmitError, TaskWaitTimeoutError
from newfuse.nats import DirectGet, MessageStreamSpec, Subjects
from newfuse.schemas import DeadLetter
from support import run_fuse, wait_for

Handler = Callable[[TaskContext, Any], Awaitable[Any]]


@asynccontextmanager
async def running(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    queue: str,
    handler: Handler,
    *,
    key: str = "1",
    **settings: Any,
) -> AsyncIterator[RunningWorker]:
    settings.setdefault("backoff", (0.02, 0.1))
    worker = Worker(queue, handler, heartbeat=0.5, **settings)
    async with worker.run(nc, key=key, prefix=prefix, stream=stream) as run:
        yield run


@pytest.fixture
async def tasks(nc: Client, prefix: str, stream: MessageStreamSpec) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(nc, prefix=prefix, stream=stream) as queue:
        yield queue


def states(task: Task) -> list[str]:
    return [status.state for status in task.statuses]


async def test_a_task_goes_submitted_working_completed_with_its_result_as_artifact(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    async def double(ctx: TaskContext, job: dict[str, int]) -> dict[str, int]:
        assert ctx.priority == 4
        return {"y": job["x"] * 2}

    task_id = await tasks.submit("math", {"x": 21}, priority=4)
    assert (await tasks.get(task_id)) is not None
    assert (await tasks.get(task_id)).state == "submitted"  # type: ignore[union-attr]
    async with running(nc, prefix, stream, "math", double) as worker:
        task = await tasks.wait(task_id, timeout=20)
        await settled(nc, prefix, consumer_name("math", 4))
    assert states(task) == ["submitted", "working", "completed"]
    assert task.agent == "task-math/1"
    assert [a.parts[0].data for a in task.artifacts] == [{"y": 42}]
    assert [m.payload for m in task.history] == [{"x": 21}]
    assert worker.handled == 1


async def test_submit_refuses_terms_out_of_range_naming_the_field(tasks: TaskQueue) -> None:
    with pytest.raises(TaskSubmitError, match=r"priority=10: use 0 \(lowest\) to 9"):
        await tasks.submit("q", priority=10)
    with pytest.raises(TaskSubmitError, match=r"max_attempts=0: use 1 to 10"):
        await tasks.submit("q", max_attempts=0)
    with pytest.raises(TaskSubmitError, match=r"deadline=-1: it has passed"):
        await tasks.submit("q", deadline=-1)
    with pytest.raises(InvalidNameError, match="task queue"):
        await tasks.submit("a.b")


async def test_each_task_goes_to_exactly_one_of_three_workers(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    runs: list[tuple[str, str]] = []
    all_up = asyncio.Event()  # until the three run, the first ones hold what they took

    def handler_of(key: str) -> Handler:
        async def work(ctx: TaskContext, job: dict[str, int]) -> int:
            runs.append((key, ctx.task_id))
            await all_up.wait()
            await asyncio.sleep(0.01)
            return job["n"]

        return work

    ids = [await tasks.submit("share", {"n": n}) for n in range(60)]
    async with (
        running(nc, prefix, stream, "share", handler_of("a"), key="a", concurrency=2),
        running(nc, prefix, stream, "share", handler_of("b"), key="b", concurrency=2),
        running(nc, prefix, stream, "share", handler_of("c"), key="c", concurrency=2),
    ):
        all_up.set()  # a worker pulls only what it can run soon: the last one started finds work
        done = [await tasks.wait(task_id, timeout=30) for task_id in ids]
    assert sorted(task_id for _, task_id in runs) == sorted(ids)  # each ran once, no repeats
    assert all(states(task) == ["submitted", "working", "completed"] for task in done)
    by = {task.id: task.agent for task in done}
    assert all(by[task_id] == f"task-share/{key}" for key, task_id in runs)
    assert {key for key, _ in runs} == {"a", "b", "c"}


async def test_a_handler_running_past_ack_wait_keeps_its_task_also_while_its_worker_stops(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    runs: list[str] = []
    started = asyncio.Event()

    def handler_of(key: str) -> Handler:
        async def work(ctx: TaskContext, job: dict[str, Any]) -> str:
            runs.append(key)
            started.set()
            await asyncio.sleep(2.5)  # past ack_wait: only in-progress acks keep the task here
            return key

        return work

    async with running(nc, prefix, stream, "long", handler_of("a"), key="a", ack_wait=1.0) as a:
        task_id = await tasks.submit("long", {})
        await asyncio.wait_for(started.wait(), timeout=20)
        async with running(nc, prefix, stream, "long", handler_of("b"), key="b", ack_wait=1.0):
            await a.close(grace=20)  # stopping: the running handler is let finish
            task = await tasks.wait(task_id, timeout=20)
            await settled(nc, prefix, consumer_name("long", 0))
    assert runs == ["a"], "the task was redelivered while its handler ran"
    assert states(task) == ["submitted", "working", "completed"]
    assert task.agent == "task-long/a"


async def test_higher_priorities_go_first(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    gate = asyncio.Event()
    order: list[int] = []

    async def work(ctx: TaskContext, job: dict[str, int]) -> None:
        if job.get("block"):
            await gate.wait()
        else:
            order.append(ctx.priority)
            await asyncio.sleep(0.2)  # ample time for the lane's refill to arrive

    async with running(nc, prefix, stream, "prio", work, concurrency=1, aging=60) as worker:
        blocker = await tasks.submit("prio", {"block": 1}, priority=5)
        await wait_for(lambda: _state(tasks, blocker, "working"))
        ids = [await tasks.submit("prio", {}, priority=0) for _ in range(4)]
        ids += [await tasks.submit("prio", {}, priority=9) for _ in range(4)]

        async def pulled() -> bool:  # both lanes hold tasks before the blocker ends
            lanes = {lane.priority: len(lane.msgs) for lane in worker._lanes}
            return lanes[0] > 0 and lanes[9] > 0

        await wait_for(pulled)
        gate.set()
        for task_id in ids:
            await tasks.wait(task_id, timeout=20)
    assert order == [9, 9, 9, 9, 0, 0, 0, 0]


async def _state(tasks: TaskQueue, task_id: str, state: str) -> bool:
    task = await tasks.get(task_id)
    return task is not None and task.state == state


FLOOD = 400
AGING = 0.2
HANDLER = 0.01


async def test_aging_lets_priority_0_progress_under_a_priority_9_flood(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    async def work(ctx: TaskContext, job: dict[str, int]) -> None:
        await asyncio.sleep(HANDLER)

    flood: list[str] = []
    for _ in range(0, FLOOD, 50):
        flood += await asyncio.gather(*(tasks.submit("flood", {}, priority=9) for _n in range(50)))
    low = [await tasks.submit("flood", {}, priority=0) for _ in range(3)]
    async with running(nc, prefix, stream, "flood", work, concurrency=2, aging=AGING) as worker:
        for task_id in low:
            await tasks.wait(task_id, timeout=60)
        left = await queue_stats(nc, prefix=prefix)
        waits = [wait for priority, wait in worker.started if priority == 0]
    # Progress, not timing: every priority-0 task finished while the flood still waited.
    assert left[0].depth[9] > 0, "the flood drained before priority 0 ran: no aging was needed"
    assert len(waits) == 3
    print(
        f"\npriority-0 waits under a priority-9 flood of {FLOOD} (aging {AGING}s, handler "
        f"{HANDLER}s, 2 slots): {', '.join(f'{w:.3f}s' for w in waits)}; "
        f"{left[0].depth[9]} of the flood still waiting"
    )


async def test_a_task_canceled_while_queued_is_skipped_and_stays_canceled(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    ran: list[str] = []

    async def work(ctx: TaskContext, job: dict[str, Any]) -> None:
        ran.append(ctx.task_id)

    doomed = await tasks.submit("cq", {})
    assert await tasks.cancel(doomed) is True
    kept = await tasks.submit("cq", {})
    async with running(nc, prefix, stream, "cq", work) as worker:
        await tasks.wait(kept, timeout=20)
        await settled(nc, prefix, consumer_name("cq", 0))
    task = await tasks.get(doomed)
    assert task is not None and states(task) == ["submitted", "canceled"]
    assert ran == [kept]
    assert worker.skipped == 1
    assert await tasks.cancel(doomed) is False  # ended: nothing more is stored
    assert await tasks.cancel(kept) is False


async def test_a_queued_tasks_events_are_on_its_queue_and_submitter_subject_found_by_id_alone(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    task_id = await tasks.submit("wq", {})
    subject = Subjects(prefix).queued_task_events("wq", "anonymous", task_id)
    assert [payload(e).state for e in await stored(nc, prefix, subject)] == ["submitted"]
    fuse = ("--nats", nats_url, "--prefix", prefix, "tasks")
    shown = await asyncio.to_thread(run_fuse, *fuse, "show", task_id, "--json")
    assert json.loads(shown.stdout)["state"] == "submitted"
    listed = await asyncio.to_thread(run_fuse, *fuse, "list", "--json")
    assert task_id in [json.loads(line)["id"] for line in listed.stdout.splitlines()]
    history = await asyncio.to_thread(
        run_fuse, *fuse[:-1], "agents", "history", "--task", task_id, "--json"
    )
    turns = [json.loads(line) for line in history.stdout.splitlines()]
    assert [(t["kind"], t["to"]) for t in turns if t["kind"] == "status"] == [
        ("status", f"task {task_id}")
    ]
    async with TaskQueue(nc, prefix=prefix, stream=stream) as other:  # it did not submit it
        assert (await other.get(task_id, queue="wq")) is not None  # any submitter's, in wq
        assert (await other.get(task_id, queue="elsewhere")) is None
        assert await other.cancel(task_id) is True
    assert [payload(e).state for e in await stored(nc, prefix, subject)] == [
        "submitted",
        "canceled",
    ]
    assert await stored(nc, prefix, Subjects(prefix).task_events(task_id)) == []


async def test_a_running_task_canceled_sees_the_cancellation_and_ends_canceled(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    started = asyncio.Event()
    seen: list[bool] = []

    async def work(ctx: TaskContext, job: dict[str, Any]) -> str:
        ctx.publish("news", "half-done", {})  # dropped: a canceled task's effects do not count
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append(ctx.cancelled)
            raise
        return "never"

    task_id = await tasks.submit("cr", {})
    async with running(nc, prefix, stream, "cr", work) as worker:
        await asyncio.wait_for(started.wait(), timeout=20)
        assert await tasks.cancel(task_id) is True
        await settled(nc, prefix, consumer_name("cr", 0))
    task = await tasks.get(task_id)
    assert task is not None and states(task) == ["submitted", "working", "canceled"]
    assert seen == [True]
    assert worker.cancelled == 1
    assert await stored(nc, prefix, Subjects(prefix).topic("news")) == []


async def test_deadlines_fail_a_task_before_it_starts_and_while_it_runs(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    ran: list[str] = []

    async def work(ctx: TaskContext, job: dict[str, Any]) -> None:
        ran.append(ctx.task_id)
        if job.get("slow"):
            await asyncio.sleep(60)

    late = await tasks.submit("dl", {}, deadline=0.2)

    async def past() -> bool:
        return datetime.now(UTC).timestamp() > (await tasks.get(late)).created.timestamp() + 0.3  # type: ignore[union-attr]

    await wait_for(past)
    async with running(nc, prefix, stream, "dl", work) as worker:
        expired = await tasks.wait(late, timeout=20)
        slow = await tasks.submit("dl", {"slow": True}, deadline=1.0)
        overrun = await tasks.wait(slow, timeout=20)
        await settled(nc, prefix, consumer_name("dl", 0))
    assert states(expired) == ["submitted", "failed"]
    assert "passed before it started" in (expired.statuses[-1].message.parts[0].text or "")  # type: ignore[union-attr]
    assert states(overrun) == ["submitted", "working", "failed"]
    assert "passed while it ran" in (overrun.statuses[-1].message.parts[0].text or "")  # type: ignore[union-attr]
    assert ran == [slow]
    assert worker.expired == 2


async def test_max_attempts_then_a_dead_letter_with_the_last_error(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    attempts: dict[str, int] = {}

    async def work(ctx: TaskContext, job: dict[str, Any]) -> str:
        attempts[ctx.task_id] = ctx.attempt
        if ctx.attempt < job["succeed_at"]:
            raise ValueError(f"boom {ctx.attempt}")
        return "ok"

    doomed = await tasks.submit("ma", {"succeed_at": 99}, max_attempts=3)
    saved = await tasks.submit("ma", {"succeed_at": 2})
    async with running(nc, prefix, stream, "ma", work, max_attempts=2):
        failed = await tasks.wait(doomed, timeout=20)
        completed = await tasks.wait(saved, timeout=20)
        await settled(nc, prefix, consumer_name("ma", 0))
    assert attempts == {doomed: 3, saved: 2}  # the task's 3 over the worker's 2; then the default
    assert states(failed) == ["submitted", "working", "working", "working", "failed"]
    assert states(completed) == ["submitted", "working", "working", "completed"]
    assert "boom 3" in (failed.statuses[-1].message.parts[0].text or "")  # type: ignore[union-attr]
    letters = [
        payload(e)
        for e in await stored(nc, prefix, Subjects(prefix).dead_letters(consumer_name("ma", 0)))
    ]
    assert len(letters) == 1 and isinstance(letters[0], DeadLetter)
    assert letters[0].attempts == 3
    assert "failed 3 attempt(s)" in letters[0].error and "ValueError: boom 3" in letters[0].error


async def test_hostile_bodies_on_a_queue_are_dead_lettered_and_the_worker_carries_on(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue
) -> None:
    subjects = Subjects(prefix)
    js = nc.jetstream()
    await js.publish(subjects.task("ho", 3), b"\xff not json")
    await js.publish(subjects.task("ho", 3), b"[" * 5000)
    good = await tasks.submit("ho", {}, priority=3)
    direct = DirectGet(nc, subjects.message_stream_name, timeout=5.0)
    stolen = await direct.last_for(subjects.task("ho", 3), "test read")
    assert stolen is not None
    bad_terms = json.loads(stolen.data)
    bad_terms["id"] = "bad-terms"
    bad_terms["metadata"]["priority"] = "eleven"
    bad_terms["data"]["taskId"] = "bad-terms-task"
    await js.publish(subjects.task("ho", 3), json.dumps(bad_terms).encode())
    bad_id = json.loads(stolen.data)
    bad_id["id"] = "bad-id"
    bad_id["data"]["taskId"] = "no.such>subject"
    await js.publish(subjects.task("ho", 3), json.dumps(bad_id).encode())
    other, headers = wire.encode("x.y", "something.else", {"a": 1}, event_id="other")
    await js.publish(subjects.task("ho", 3), other, headers=headers)

    async def work(ctx: TaskContext, job: dict[str, Any]) -> str:
        return "fine"

    async with running(nc, prefix, stream, "ho", work) as worker:
        await tasks.wait(good, timeout=20)
        await settled(nc, prefix, consumer_name("ho", 3))
    letters = [
        payload(e) for e in await stored(nc, prefix, subjects.dead_letters(consumer_name("ho", 3)))
    ]
    errors = sorted(letter.error for letter in letters)
    assert len(errors) == 5, errors
    assert any("task id" in e and "no.such>subject" in e for e in errors), errors
    assert any("$.metadata.priority" in e and "'eleven' is not a priority 0-9" in e for e in errors)
    assert worker.handled == 1
    # the task whose terms were broken fails with its dead letter's error
    broken = await tasks.get("bad-terms-task")
    assert broken is not None and broken.state == "failed"
    assert "priority" in (broken.statuses[-1].message.parts[0].text or "")  # type: ignore[union-attr]


async def test_fuse_queues_list_shows_depth_per_priority_in_flight_workers_and_oldest(
    nc: Client, prefix: str, stream: MessageStreamSpec, tasks: TaskQueue, nats_url: str
) -> None:
    gate = asyncio.Event()

    async def work(ctx: TaskContext, job: dict[str, Any]) -> None:
        await gate.wait()

    for priority, count in ((0, 3), (7, 2)):
        for _ in range(count):
            await tasks.submit("idle", {}, priority=priority)
    first = await tasks.submit("busy", {}, priority=9)
    async with running(nc, prefix, stream, "busy", work, concurrency=1):
        await wait_for(lambda: _state(tasks, first, "working"))
        for _ in range(4):
            await tasks.submit("busy", {}, priority=2)
        await wait_for(lambda: _busy_depth(nc, prefix, 2))
        table = await asyncio.to_thread(
            run_fuse, "--nats", nats_url, "--prefix", prefix, "queues", "list"
        )
        listed = await asyncio.to_thread(
            run_fuse, "--nats", nats_url, "--prefix", prefix, "queues", "list", "--json"
        )
        gate.set()
    rows = {row["queue"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert set(rows) == {"busy", "idle"}
    idle, busy = rows["idle"], rows["busy"]
    assert idle["depth"] == {"0": 3, "7": 2} and idle["total"] == 5
    assert idle["in_flight"] == 0 and idle["workers"] == 0
    assert idle["oldest_priority"] == 0 and idle["oldest_waiting"] is not None
    assert busy["in_flight"] >= 1 and busy["workers"] == 1
    assert sum(busy["depth"].values()) + busy["in_flight"] == 5
    assert busy["depth"]["9"] == 0
    lines = table.stdout.splitlines()
    assert any(line.split()[:1] == ["idle"] and "7:2" in line and "0:3" in line for line in lines)
    assert "QUEUE" in lines[0] and "OLDEST" in lines[0]


async def _busy_depth(nc: Client, prefix: str, wanted: int) -> bool:
    found = {stats.queue: stats for stats in await queue_stats(nc, prefix=prefix)}
    busy = found.get("busy")
    return busy is not None and busy.in_flight + busy.total == 5 and busy.depth.get(2, 0) >= wanted


async def test_fuse_queues_list_never_creates_the_stream(nats_url: str) -> None:
    result = run_fuse("--nats", nats_url, "--prefix", "nowhere9", "queues", "list", check=False)
    assert result.returncode != 0
    assert "nowhere9" in result.stderr


async def test_waiting_for_a_task_no_worker_takes_names_its_state(tasks: TaskQueue) -> None:
    task_id = await tasks.submit("nobody", [1, 2])  # not a dict: sent as {"value": [1, 2]}
    with pytest.raises(TaskWaitTimeoutError, match=r"is still submitted after 0.2s"):
        await tasks.wait(task_id, timeout=0.2)
    task = await tasks.get(task_id)
    assert task is not None and task.history[0].payload == {"value": [1, 2]}


def test_a_worker_refuses_settings_it_cannot_use() -> None:
    async def work(ctx: TaskContext, job: dict[str, Any]) -> None:
        return None

    with pytest.raises(AgentConfigError, match=r"'task-q': max_attempts=11: use 1 to 10"):
        Worker("q", work, max_attempts=11)
    with pytest.raises(AgentConfigError, match=r"aging=0: seconds above 0"):
        Worker("q", work, aging=0)
