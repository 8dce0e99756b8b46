"""Three worker processes of uneven speed share a queue: each task once, the fast take more."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from messages import settled
from nats.aio.client import Client

from newfuse.agents import TaskQueue
from newfuse.agents.queues import consumer_name
from newfuse.nats import MessageStreamSpec
from support import reap

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("queue_worker.py")
TASKS = 90
SPEEDS = {"fast": 0.005, "medium": 0.03, "slow": 0.12}  # seconds per task


async def start_worker(nats_url: str, prefix: str, key: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, str(WORKER), nats_url, prefix, "uneven", key, str(SPEEDS[key])],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
    assert line.strip() == "ready", line
    return process


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
        for process in workers:
            if process.stdout is not None:
                process.stdout.close()
            reap(process)
    for task in done:  # one worker each: one working, then completed by that same worker
        assert [s.state for s in task.statuses] == ["submitted", "working", "completed"]
        assert task.statuses[1].sender == task.statuses[2].sender == task.agent
        assert task.artifacts[0].parts[0].text == (task.agent or "").split("/")[1]
    shares = Counter((task.agent or "").split("/")[1] for task in done)
    print(f"\nshares of {TASKS} tasks by speed {SPEEDS}: {dict(shares)}")
    assert sum(shares.values()) == TASKS
    assert shares["fast"] > shares["medium"] > shares["slow"]
