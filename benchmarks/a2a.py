"""A2A benchmark: agents on the log side by side with raw nats-py on the same server.

One run starts one embedded nats-server. Lines (JSON, keys name, ours, baseline, unit, ratio,
n; ratio oriented so higher is better):
- `a2a.fan_in`, `a2a.fan_in.64`, `a2a.fan_in.256`: 16, 64 and 256 concurrent senders to one
  agent, messages handled per second, against as many raw nats-py `publish_async` loops to one
  subject drained by a raw pull consumer that acks each (same run, alternating rounds);
- `a2a.round_trip.fast_path.p50/p99` and `a2a.round_trip.log.p50/p99`: one request at a time,
  against raw nats-py request/reply (a core subscriber that responds);
- `a2a.instances.1` / `a2a.instances.3`: messages handled per second by one and by three
  instances of one agent type (baseline: the one-instance figure), with each instance's share.

Usage: `python benchmarks/a2a.py [--quick]`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import nats
from _harness import emit, parser, percentile, progress, run_benchmark, run_id, workdir
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from newfuse.agents import Agent, AgentClient, Context
from newfuse.nats import MessageStreamSpec, NatsServer, Subjects

SENDERS = (16, 64, 256)
"""Concurrent senders of the fan-in lines (the issue's 16, 64 and 256 writers to one stream)."""


@dataclass(frozen=True)
class Sizes:
    """How much each phase does; `--quick` is a smoke run of a few seconds."""

    fan_in: int  # messages per fan-in round
    round_trips: int  # sequential requests per latency round
    rounds: int  # alternating rounds per measurement (the best of each side is kept)
    pool: int  # messages queued for the one-instance and three-instance rounds


FULL = Sizes(fan_in=20_000, round_trips=2_000, rounds=3, pool=20_000)
QUICK = Sizes(fan_in=800, round_trips=100, rounds=1, pool=3_000)


def counting_agent(name: str, counts: dict[str, int], done: asyncio.Event, total: int) -> Agent:
    agent = Agent(name, concurrency=64)

    @agent.handler("tick")
    async def tick(ctx: Context, body: dict[str, Any]) -> None:
        counts["all"] = counts.get("all", 0) + 1
        if counts["all"] >= total:
            done.set()

    return agent


async def fan_in_ours(
    nc: NatsClient, stream: MessageStreamSpec, prefix: str, n: int, senders: int
) -> float:
    counts: dict[str, int] = {}
    done = asyncio.Event()
    agent = counting_agent(f"sink{run_id()}", counts, done, n // senders * senders)
    async with (
        agent.run(nc, key="1", prefix=prefix, stream=stream, fast_path=False),
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        start = time.perf_counter()

        async def sender(count: int) -> None:
            for i in range(count):
                await client.send(agent.type, "tick", {"i": i})

        await asyncio.gather(*(sender(n // senders) for _ in range(senders)))
        async with asyncio.timeout(120):
            await done.wait()
        return (n // senders * senders) / (time.perf_counter() - start)


async def fan_in_raw(nc: NatsClient, stream_name: str, subject: str, n: int, senders: int) -> float:
    js = nc.jetstream()
    durable = f"raw{run_id()}"
    await js.add_consumer(
        stream_name,
        ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, filter_subject=subject),
    )
    psub = await js.pull_subscribe_bind(durable, stream_name)
    total = n // senders * senders
    body = b'{"i": 0}'

    async def consume() -> None:
        handled = 0
        while handled < total:
            try:
                msgs = await psub.fetch(256, timeout=5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
            handled += len(msgs)

    start = time.perf_counter()
    consumer = asyncio.create_task(consume())

    async def sender(count: int) -> None:
        for _ in range(count):
            await js.publish_async(subject, body)

    await asyncio.gather(*(sender(n // senders) for _ in range(senders)))
    await js.publish_async_completed()
    async with asyncio.timeout(120):
        await consumer
    elapsed = time.perf_counter() - start
    await psub.unsubscribe()
    return total / elapsed


async def bench_fan_in(
    nc: NatsClient, stream: MessageStreamSpec, prefix: str, sizes: Sizes
) -> None:
    subjects = Subjects(prefix)
    for senders in SENDERS:
        ours, raw = 0.0, 0.0
        for round_ in range(sizes.rounds):
            ours = max(ours, await fan_in_ours(nc, stream, prefix, sizes.fan_in, senders))
            subject = f"{prefix}.task.raw{senders}x{round_}.0"
            raw = max(
                raw,
                await fan_in_raw(nc, subjects.message_stream_name, subject, sizes.fan_in, senders),
            )
            progress(f"fan-in x{senders} round {round_ + 1}: ours {ours:,.0f}/s, raw {raw:,.0f}/s")
        # 16 keeps the line's first name (the target is stated for 16 senders)
        name = "a2a.fan_in" if senders == SENDERS[0] else f"a2a.fan_in.{senders}"
        emit(
            name,
            ours,
            raw,
            "msgs/s",
            n=sizes.fan_in // senders * senders,
            lower_is_better=False,
            senders=senders,
        )


async def bench_round_trip(
    nc: NatsClient, stream: MessageStreamSpec, prefix: str, sizes: Sizes
) -> None:
    echo = Agent("echo", concurrency=4)

    @echo.handler("ping")
    async def ping(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
        return body

    async def raw_responder(msg: Msg) -> None:
        await msg.respond(msg.data)

    raw_sub = await nc.subscribe(f"{prefix}.rawrpc", cb=raw_responder)
    samples: dict[str, list[float]] = {"raw": [], "fast": [], "log": []}
    async with (
        echo.run(nc, key="1", prefix=prefix, stream=stream),
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        body = {"q": "x" * 64}
        raw_body = b'{"q": "' + b"x" * 64 + b'"}'
        for _ in range(20):  # warm-up
            await client.call("echo", "ping", body)
            await client.request("echo", "ping", body)
            await nc.request(f"{prefix}.rawrpc", raw_body, timeout=5)
        sides = {
            "raw": lambda: nc.request(f"{prefix}.rawrpc", raw_body, timeout=5),
            "fast": lambda: client.call("echo", "ping", body),
            "log": lambda: client.request("echo", "ping", body),
        }
        for round_ in range(sizes.rounds):
            # Each side in its own block: a log request's marker and ack, still in flight when
            # the next call starts, would otherwise slow whichever side comes next.
            for side, call in sides.items():
                for _ in range(sizes.round_trips):
                    start = time.perf_counter()
                    await call()
                    samples[side].append(time.perf_counter() - start)
                await asyncio.sleep(0.2)
            progress(f"round trips, round {round_ + 1} done")
    await raw_sub.unsubscribe()
    ordered = {side: sorted(values) for side, values in samples.items()}
    for label, side in (("fast_path", "fast"), ("log", "log")):
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            emit(
                f"a2a.round_trip.{label}.{name}",
                percentile(ordered[side], fraction) * 1e6,
                percentile(ordered["raw"], fraction) * 1e6,
                "us",
                n=len(ordered[side]),
                lower_is_better=True,
            )


async def instances_rate(
    nc: NatsClient, stream: MessageStreamSpec, prefix: str, n: int, instances: int
) -> tuple[float, list[float]]:
    agent_type = f"pool{run_id()}"
    counts: dict[str, int] = {}
    done = asyncio.Event()
    agent = Agent(agent_type, concurrency=16)

    @agent.handler("job")
    async def job(ctx: Context, body: dict[str, Any]) -> None:
        key = ctx.agent_id.key
        counts[key] = counts.get(key, 0) + 1
        await asyncio.sleep(0.001)  # a handler that waits on something (a model, a tool)
        if sum(counts.values()) >= n:
            done.set()

    async with AgentClient(nc, prefix=prefix, stream=stream) as client:
        for i in range(n):  # queued first: the rate is the handlers', not the senders'
            await client.send(agent_type, "job", {"i": i})
        start = time.perf_counter()
        runs = [
            agent.run(nc, key=str(k), prefix=prefix, stream=stream, fast_path=False)
            for k in range(instances)
        ]
        await asyncio.gather(*(running.__aenter__() for running in runs))
        try:
            async with asyncio.timeout(120):
                await done.wait()
            elapsed = time.perf_counter() - start
        finally:
            for running in runs:
                await running.close()
    total = sum(counts.values())
    return total / elapsed, [round(counts.get(str(k), 0) / total, 3) for k in range(instances)]


async def bench_instances(
    nc: NatsClient, stream: MessageStreamSpec, prefix: str, sizes: Sizes
) -> None:
    n = sizes.pool
    one, _ = await instances_rate(nc, stream, prefix, n, 1)
    three, shares = await instances_rate(nc, stream, prefix, n, 3)
    progress(f"instances: one {one:,.0f}/s, three {three:,.0f}/s, shares {shares}")
    emit("a2a.instances.1", one, one, "msgs/s", n=n, lower_is_better=False, shares=[1.0])
    emit("a2a.instances.3", three, one, "msgs/s", n=n, lower_is_better=False, shares=shares)


async def main(sizes: Sizes) -> None:
    async with workdir("a2a") as files:
        async with NatsServer(data_dir=files / "nats") as server:
            progress(f"nats-server at {server.url}, files in {files}")
            nc = await nats.connect(server.url)
            try:
                prefix = f"bq{run_id()}"
                stream = MessageStreamSpec(subjects=Subjects(prefix))
                await bench_fan_in(nc, stream, prefix, sizes)
                await bench_round_trip(nc, stream, prefix, sizes)
                await bench_instances(nc, stream, prefix, sizes)
            finally:
                await nc.close()
    progress("done")


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    args = parser(__doc__).parse_args(argv)
    run_benchmark(main(QUICK if args.quick else FULL))


if __name__ == "__main__":
    cli()
