"""A worker process of a task queue: `python queue_worker.py NATS_URL PREFIX QUEUE KEY SECONDS`.

Each task sleeps SECONDS (the worker's speed) and returns the worker's key; one handler at a
time (concurrency 1), so the worker pulls a task only when it is about to be free.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from newfuse.agents import TaskContext, Worker
from newfuse.nats import MessageStreamSpec, Subjects, connect


async def main(url: str, prefix: str, queue: str, key: str, seconds: str) -> None:
    async def work(ctx: TaskContext, job: dict[str, Any]) -> str:
        await asyncio.sleep(float(seconds))
        return key

    nc = await connect(url, name=f"queue-worker-{key}")
    stream = MessageStreamSpec(subjects=Subjects(prefix), duplicate_window=0.5)
    worker = Worker(queue, work, concurrency=1, heartbeat=0.5)
    async with worker.run(nc, key=key, prefix=prefix, stream=stream):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
