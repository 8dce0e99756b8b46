"""Processes for the timer tests.

`python timer_worker.py schedule NATS PREFIX KEY SECONDS`: set JetStream timer KEY (namespace
`test`) to fire SECONDS from now, with payload `{"by": <pid>}`, print `set`, and exit.

`python timer_worker.py drive NATS PREFIX NAME`: an orchestrator of saga `slow`, whose one step
`work` (timeout 3 s, so a lease of 5 s) hangs in this process: it prints `ready`, then runs
until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta

from newfuse.core.orchestrator import Orchestrator
from newfuse.core.saga import Action, Saga, StepContext
from newfuse.core.timers import JetStreamTimers
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import connect

STEP_TIMEOUT = 3.0


def slow(action: Action | None = None) -> Saga:
    """Saga `slow`: one step `work`; `action` runs it (default: hang)."""
    saga = Saga("slow")

    async def hang(ctx: StepContext) -> str:
        await asyncio.sleep(3600)
        return "never"

    saga.step("work", timeout=STEP_TIMEOUT, attempts=1)(action or hang)
    return saga


async def schedule(nats_url: str, prefix: str, key: str, seconds: str) -> None:
    nc = await connect(nats_url, name="timer-worker")
    async with JetStreamTimers(nc, prefix=prefix, namespace="test") as timers:
        at = datetime.now(UTC) + timedelta(seconds=float(seconds))
        await timers.schedule(key, at, {"by": os.getpid()})
    await nc.close()
    print("set", flush=True)


async def drive(nats_url: str, prefix: str, name: str) -> None:
    store = await JetStreamEventStore.connect(nats_url, prefix=prefix)
    async with Orchestrator(store, [slow()], name=name):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    asyncio.run(schedule(*args) if command == "schedule" else drive(*args))
