"""An orchestrator process for the crash tests: `python saga_worker.py NATS PREFIX REDIS NAME`.

Its saga, `booking`, has four steps (charge and notify a parallel group) whose effects are
Redis writes keyed by the step's idempotency key: `runs:<key>` counts every time an action or
compensation ran, `applied:<key>` is set once (SET NX) by the first run, so the test counts
effects apart from runs. A saga whose input says `fail` fails its last step for good and is
compensated. On SIGTERM it prints its counters as JSON and stops.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import redis.asyncio as redis

from newfuse.core.orchestrator import Orchestrator
from newfuse.core.saga import Saga, StepContext
from newfuse.errors import FuseError
from newfuse.eventstore.jetstream import JetStreamEventStore


class Refused(FuseError):
    """The last step refuses a saga that asks for it (not retryable)."""

    retryable = False


def booking(db: redis.Redis, prefix: str) -> Saga:
    saga = Saga("booking")

    async def effect(ctx: StepContext) -> None:
        await db.incr(f"{prefix}:runs:{ctx.idempotency_key}")
        await asyncio.sleep(0.02)  # a crash may come between the effect and its outcome
        await db.set(f"{prefix}:applied:{ctx.idempotency_key}", ctx.attempt, nx=True)
        await asyncio.sleep(0.02)

    for name in ("reserve", "charge", "notify", "confirm"):

        async def action(ctx: StepContext, name: str = name) -> str:
            if name == "confirm" and ctx.input.get("fail"):
                raise Refused("the supplier refused")
            await effect(ctx)
            return name

        group = "pay" if name in ("charge", "notify") else None
        saga.step(name, timeout=1.0, attempts=3, backoff=0.05, group=group)(action)
        saga.compensate(name)(effect)
    return saga


async def main(nats_url: str, prefix: str, redis_url: str, name: str) -> None:
    db = redis.Redis.from_url(redis_url)
    store = await JetStreamEventStore.connect(nats_url, prefix=prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Orchestrator(store, [booking(db, prefix)], name=name) as orchestrator:
        print("ready", flush=True)
        await stop.wait()
    print(json.dumps({"runs": orchestrator.runs, "fenced": orchestrator.fenced}), flush=True)
    await store.close()
    await db.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
