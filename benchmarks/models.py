"""Model-call benchmark: the cost of recording a call as a `model.invoked` event.

One run starts one embedded nats-server and the loopback OpenAI-compatible server of the tests
(tests/openai_server.py: a real HTTP/1.1 server). Calls alternate one by one between the bare
OpenAICompatibleProvider (the baseline) and the same provider recorded. Lines (JSON, keys name,
ours, baseline, unit, ratio, n; ratio oriented so higher is better; `overhead_ms` and
`target_ms` = max(10% of the baseline, 1 ms), `within_target`):
- `models.chat.p50|p99|mean`: a whole-answer call inside an agent's handler, `ctx.chat(...)`
  against the bare provider in the same handler: the call returns once the model answered, its
  record is stored in the background (awaited before the handler's outcome is committed, which
  is outside the measured call);
- `models.stream.p50|p99|mean`: the same for a streamed call read to its end;
- `models.recorder.p50|p99|mean`: a call through `ModelRecorder` outside handlers (records in
  the background, the default);
- `models.recorder_awaited.p50|p99|mean`: `ModelRecorder(wait=True)`: the call returns once its
  record's PubAck came (what every recorded call paid before records went to the background).

Usage: `python benchmarks/models.py [--quick]`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from _harness import emit, parser, percentile, progress, run_benchmark, run_id, workdir
from nats.aio.client import Client as NatsClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from newfuse.agents import Agent, AgentClient, Context
from newfuse.agents.models import (
    ChatMessage,
    ModelProvider,
    ModelRecorder,
    OpenAICompatibleProvider,
    collect,
)
from newfuse.nats import MessageStreamSpec, NatsServer, Subjects, ensure_event_stream
from openai_server import OpenAIServer

PROMPT = [
    ChatMessage(role="system", content="You answer briefly."),
    ChatMessage(role="user", content="What is the tallest mountain of Peru?"),
]


@dataclass(frozen=True)
class Sizes:
    """How much each phase does; `--quick` is a smoke run of a few seconds."""

    warmup: int  # calls of each kind before measuring
    calls: int  # measured calls of each kind (alternating)


FULL = Sizes(warmup=200, calls=3_000)
QUICK = Sizes(warmup=20, calls=200)


async def alternate(
    bare: Callable[[], Awaitable[object]],
    recorded: Callable[[], Awaitable[object]],
    sizes: Sizes,
) -> tuple[list[float], list[float]]:
    """Milliseconds of each bare and each recorded call, one of each in turn."""
    for _ in range(sizes.warmup):
        await bare()
        await recorded()
    plain: list[float] = []
    ours: list[float] = []
    for index in range(sizes.calls):
        order = (
            ((bare, plain), (recorded, ours)) if index % 2 else ((recorded, ours), (bare, plain))
        )
        for call, into in order:
            start = time.perf_counter()
            await call()
            into.append((time.perf_counter() - start) * 1000.0)
    return sorted(plain), sorted(ours)


def report(kind: str, plain: list[float], ours: list[float], figures: list[str]) -> None:
    for figure in figures:
        if figure == "mean":
            theirs, mine = statistics.fmean(plain), statistics.fmean(ours)
        else:
            fraction = int(figure[1:]) / 100
            theirs, mine = percentile(plain, fraction), percentile(ours, fraction)
        target = max(0.1 * theirs, 1.0)
        emit(
            f"models.{kind}.{figure}",
            mine,
            theirs,
            "ms",
            n=len(ours),
            lower_is_better=True,
            overhead_ms=round(mine - theirs, 3),
            target_ms=round(target, 3),
            within_target=mine - theirs <= target,
        )


FIGURES = ["p50", "p99", "mean"]
PER_MESSAGE = 10  # pairs of calls one handler run makes


async def in_handler(nc: NatsClient, prefix: str, provider: ModelProvider, sizes: Sizes) -> None:
    """Calls made by a handler: bare and `ctx.model(provider)` in turn, timed inside it."""
    measured: dict[str, tuple[list[float], list[float]]] = {}
    agent = Agent("bench", concurrency=1)

    @agent.handler("measure")
    async def measure(ctx: Context, job: dict[str, Any]) -> dict[str, int]:
        recorded = ctx.model(provider)
        if job["kind"] == "chat":

            async def bare() -> object:
                return await provider.chat(PROMPT, model="bench-1")

            async def ours() -> object:
                return await recorded.chat(PROMPT, model="bench-1")

        else:

            async def bare() -> object:
                return await collect(provider.stream(PROMPT, model="bench-1"))

            async def ours() -> object:
                return await collect(recorded.stream(PROMPT, model="bench-1"))

        plain, mine = await alternate(bare, ours, Sizes(warmup=0, calls=job["n"]))
        if job["keep"]:
            into = measured.setdefault(job["kind"], ([], []))
            into[0].extend(plain)
            into[1].extend(mine)
        return {"calls": len(mine)}  # the reply the benchmark waits for

    stream = MessageStreamSpec(subjects=Subjects(prefix))
    async with (
        agent.run(nc, key="1", prefix=prefix, stream=stream, fast_path=False),
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        for kind in ("chat", "stream"):
            for keep, total in ((False, sizes.warmup), (True, sizes.calls)):
                for start in range(0, total, PER_MESSAGE):
                    job = {"kind": kind, "n": min(PER_MESSAGE, total - start), "keep": keep}
                    await client.request("bench", "measure", job, timeout=60)
            plain, mine = (sorted(side) for side in measured[kind])
            progress(f"{kind} in a handler: {len(mine)} calls of each kind")
            report(kind, plain, mine, FIGURES)


async def main(sizes: Sizes) -> None:
    async with workdir("models") as files:
        async with (
            NatsServer(data_dir=files / "nats") as server,
            OpenAIServer() as loopback,
            OpenAICompatibleProvider(loopback.url) as provider,
        ):
            progress(f"nats-server at {server.url}, model server at {loopback.url}")
            nc = await nats.connect(server.url)
            try:
                prefix = f"bm{run_id()}"
                await ensure_event_stream(nc, MessageStreamSpec(subjects=Subjects(prefix)))
                await in_handler(nc, prefix, provider, sizes)

                async def bare() -> object:
                    return await provider.chat(PROMPT, model="bench-1")

                for kind, wait in (("recorder", False), ("recorder_awaited", True)):
                    async with ModelRecorder(
                        nc, source="bench", prefix=prefix, wait=wait
                    ) as recorder:
                        model = recorder.model(provider)

                        async def recorded(model: ModelProvider = model) -> object:
                            return await model.chat(PROMPT, model="bench-1")

                        plain, ours = await alternate(bare, recorded, sizes)
                        await recorder.flush()
                    progress(f"{kind}: {len(ours)} calls of each kind")
                    report(kind, plain, ours, FIGURES)
            finally:
                await nc.close()
    progress("done")


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    args = parser(__doc__).parse_args(argv)
    run_benchmark(main(QUICK if args.quick else FULL))


if __name__ == "__main__":
    cli()
