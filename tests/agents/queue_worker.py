"""A worker process of a task queue:
`python queue_worker.py NATS_URL PREFIX QUEUE KEY SECONDS [CONCURRENCY ACK_WAIT]`.

Each task publishes `task.done` with its `n` to the topic `done` (an effect, stored with the
task's completion), sleeps SECONDS (the worker's speed) and returns the worker's key; one
handler at a time by default, so the worker pulls a task only when it is about to be free.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from newfuse.agents import TaskContext, Worker
from newfuse.nats import MessageStreamSpec, Subjects, connect


async def main(
    url: str,
    prefix: str,
    queue: str,
    key: str,
    seconds: str,
    concurrency: str = "1",
    ack_wait: str = "30",
) -> None:
    async def work(ctx: TaskContext, job: dict[str, Any]) -> str:
        ctx.publish("done", "task.done", {"n": job["n"]})
        await asyncio.sleep(float(seconds))
        return key

    nc = await connect(url, name=f"queue-worker-{key}")
    stream = MessageStreamSpec(subjects=Subjects(prefix), duplicate_window=0.5)
    worker = Worker(
        queue, work, concurrency=int(concurrency), ack_wait=float(ack_wait), heartbeat=0.5
    )
    async with worker.run(nc, key=key, prefix=prefix, stream=stream):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:8]))
