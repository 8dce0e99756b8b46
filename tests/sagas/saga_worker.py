"""An orchestrator process for the crash tests: `python saga_worker.py NATS PREFIX REDIS NAME`.

Its saga, `booking`, has four steps (charge and notify a parallel group) whose effects are
Redis writes keyed by the step's idempotency key: `runs:<key>` counts every time an action or
compensation ran, `applied:<key>` is set once (SET NX) by the first run, so the test counts
effects apart from runs. A saga whose input says `fail` fails its last step for good and is
compensated. On SIGTERM it prints its counters as JSON and stops.

Its saga `transfer` locks two resources of its input (`first`, then `second`), one per step;
each effect (action or compensation) is a fenced write to its resource: one Lua script that
applies it once (SET NX on `applied:<key>`), refuses a fencing token lower than the highest the
resource has seen (counted in `refused:<resource>`), and logs `<token> <saga> <key>` to
`log:<resource>`, so the test can check the tokens per resource.
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


# KEYS: applied:<key>, fence:<resource>, log:<resource>, refused:<resource>; ARGV: token, entry
_FENCED_EFFECT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) < top then
  redis.call('INCR', KEYS[4])
  return -1
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
"""


class StaleToken(FuseError):
    """The resource has seen a higher fencing token: this holder's lock is stale."""

    retryable = False


RESOURCES = ("r0", "r1", "r2", "r3")
PAIRS = [(a, b) for i, a in enumerate(RESOURCES) for b in RESOURCES[i + 1 :]]


def transfer(db: redis.Redis, prefix: str, first: str, second: str) -> Saga:
    """`transfer-<first>-<second>`: `debit` locks `first`, `credit` locks `second` (every pair
    in the same order, so no cycle), `confirm` fails for good when the input says `fail`."""
    saga = Saga(f"transfer-{first}-{second}")

    async def fenced(ctx: StepContext, resource: str) -> None:
        await db.incr(f"{prefix}:runs:{ctx.idempotency_key}")
        await asyncio.sleep(0.02)  # a crash may come between the run and its effect
        token = ctx.locks[resource]
        keys = [
            f"{prefix}:applied:{ctx.idempotency_key}",
            *(f"{prefix}:{kind}:{resource}" for kind in ("fence", "log", "refused")),
        ]
        entry = f"{token} {ctx.saga_id} {ctx.idempotency_key}"
        if await db.eval(_FENCED_EFFECT, 4, *keys, token, entry) == -1:
            raise StaleToken(f"{resource}: token {token} is stale")
        await asyncio.sleep(0.02)

    for step, resource in (("debit", first), ("credit", second)):

        async def action(ctx: StepContext, resource: str = resource) -> None:
            await fenced(ctx, resource)

        saga.step(step, timeout=1.0, attempts=3, backoff=0.05, locks=(resource,), lock_timeout=90)(
            action
        )
        saga.compensate(step)(action)

    @saga.step("confirm", timeout=1.0, attempts=3, backoff=0.05)
    async def confirm(ctx: StepContext) -> str:
        if ctx.input.get("fail"):
            raise Refused("the bank refused")
        return "confirmed"

    return saga


def transfers(db: redis.Redis, prefix: str) -> list[Saga]:
    return [transfer(db, prefix, first, second) for first, second in PAIRS]


async def main(nats_url: str, prefix: str, redis_url: str, name: str) -> None:
    db = redis.Redis.from_url(redis_url)
    store = await JetStreamEventStore.connect(nats_url, prefix=prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sagas = [booking(db, prefix), *transfers(db, prefix)]
    async with Orchestrator(store, sagas, name=name) as orchestrator:
        print("ready", flush=True)
        await stop.wait()
    print(json.dumps({"runs": orchestrator.runs, "fenced": orchestrator.fenced}), flush=True)
    await store.close()
    await db.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
