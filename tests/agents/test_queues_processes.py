"""Worker processes: three of uneven speed share a queue (each task once, the fast take more);
one SIGKILLed mid-task and replaced (every task completed once, no effect twice)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from messages import payload, settled, stored
from nats.aio.client import Client

from newfuse.agents import TaskQueue
from newfuse.agents.queues import consumer_name
from newfuse.nats import MessageStreamSpec, Subjects
from support import reap, wait_for

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("queue_worker.py")
TASKS = 90
SPEEDS = {"fast": 0.005, "medium": 0.05, "slow": 0.2}  # seconds per task


async def start_worker(
    nats_url: str, prefix: str, key: str, *extra: str, queue: str = "uneven"
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    seconds = str(SPEEDS.get(key, 0.05))
    process = subprocess.Popen(
        [sys.executable, str(WORKER), nats_url, prefix, queue, key, seconds, *extra],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
    assert line.strip() == "ready", line
    return process


def stop(workers: list[subprocess.Popen[str]]) -> None:
    for process in workers:
        if process.stdout is not None:
            process.stdout.close()
        reap(process)


async def test_three_worker_processes_of_uneven_speed_take_each_task_once_fast_ones_more(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    workers: list[subprocess.Popen[str]] = []
    try:
        for key in SPEEDS:
            workers.append(await start_worker(nats_url, prefix, key))
        async with TaskQueue(nc, prefix=prefix, stream=stream) as queue:
            ids = [await queue.submit("uneven", {"n": n}) for n in range(TASKS)]
            done = [await queue.wait(task_id, timeout=60) for task_id in ids]
        await settled(nc, prefix, consumer_name("uneven", 0))
    finally:
        stop(workers)
    for task in done:  # one worker each: one working, then completed by that same worker
        assert [s.state for s in task.statuses] == ["submitted", "working", "completed"]
        assert task.statuses[1].sender == task.statuses[2].sender == task.agent
        assert task.artifacts[0].parts[0].text == (task.agent or "").split("/")[1]
    shares = Counter((task.agent or "").split("/")[1] for task in done)
    print(f"\nshares of {TASKS} tasks by speed {SPEEDS}: {dict(shares)}")
    assert sum(shares.values()) == TASKS
    assert shares["fast"] > shares["medium"] > shares["slow"]


async def test_a_worker_sigkilled_mid_task_is_replaced_and_every_task_completes_once(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    subjects = Subjects(prefix)
    first = await start_worker(nats_url, prefix, "doomed", "4", "1.0", queue="crash")
    workers = [first]
    try:
        async with TaskQueue(nc, prefix=prefix, stream=stream) as queue:
            ids = [await queue.submit("crash", {"n": n}) for n in range(40)]

            async def some_completed() -> bool:
                done = [await queue.get(task_id) for task_id in ids[:12]]
                return sum(1 for t in done if t is not None and t.state == "completed") >= 8

            await wait_for(some_completed, timeout=30)
            first.send_signal(signal.SIGKILL)  # 4 handlers run, more tasks are pulled
            first.wait(timeout=10)
            workers.append(await start_worker(nats_url, prefix, "heir", "4", "1.0", queue="crash"))
            done = [await queue.wait(task_id, timeout=60) for task_id in ids]
        await settled(nc, prefix, consumer_name("crash", 0))
    finally:
        stop(workers)
    assert all(task.state == "completed" for task in done)
    assert all([s.state for s in task.statuses].count("completed") == 1 for task in done)
    agents = Counter(task.agent for task in done)
    assert set(agents) == {"task-crash/doomed", "task-crash/heir"}, agents
    retried = [t for t in done if [s.state for s in t.statuses].count("working") > 1]
    assert retried, "no task was interrupted by the kill"
    effects = Counter(
        payload(e).payload["n"] for e in await stored(nc, prefix, subjects.topic("done"))
    )
    assert effects == Counter(range(40)), "an effect is missing or stored twice"
    print(f"\nafter the kill: {dict(agents)}; {len(retried)} task(s) ran twice, stored once")
