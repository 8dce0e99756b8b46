"""Model-call benchmark: the cost of recording a call as a `model.invoked` event.

One run starts one embedded nats-server and the loopback OpenAI-compatible server of the tests
(tests/openai_server.py: a real HTTP/1.1 server). Calls alternate one by one between the bare
OpenAICompatibleProvider (the baseline) and the same provider through a ModelRecorder, which
opens a span, hashes the parameters and input, and stores the record on the message stream,
awaiting its PubAck before the call returns (the most a call pays: inside a handler the record
is one more effect of the handler's pipelined commit instead). Lines (JSON, keys name, ours,
baseline, unit, ratio, n; ratio oriented so higher is better; `overhead_ms` and
`target_ms` = max(10% of the baseline, 1 ms), `within_target`):
- `models.chat.p50`, `models.chat.p99`, `models.chat.mean`: a whole-answer call, ms;
- `models.stream.p50`, `models.stream.mean`: a streamed call read to its end, ms;
- `models.chat_pipelined.p50`, `.mean`: the same through `ModelRecorder(wait=False)`: the
  record is published and its PubAck awaited in the background (all acknowledged at the end);
- `models.chat_unstored.mean`: the span, hashes and record alone, kept in memory (a CallLog),
  without the store: what recording costs before the PubAck.

Usage: `python benchmarks/models.py [--quick]`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
from _harness import emit, parser, percentile, progress, run_benchmark, run_id, workdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from newfuse.agents.models import (
    CallLog,
    ChatMessage,
    ModelProvider,
    ModelRecorder,
    OpenAICompatibleProvider,
    RecordedModel,
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
                async with ModelRecorder(nc, source="bench", prefix=prefix) as recorder:
                    model: ModelProvider = recorder.model(provider)

                    async def bare() -> object:
                        return await provider.chat(PROMPT, model="bench-1")

                    async def recorded() -> object:
                        return await model.chat(PROMPT, model="bench-1")

                    plain, ours = await alternate(bare, recorded, sizes)
                    progress(f"chat: {len(ours)} calls of each kind")
                    report("chat", plain, ours, ["p50", "p99", "mean"])

                    async def bare_stream() -> object:
                        return await collect(provider.stream(PROMPT, model="bench-1"))

                    async def recorded_stream() -> object:
                        return await collect(model.stream(PROMPT, model="bench-1"))

                    plain, ours = await alternate(bare_stream, recorded_stream, sizes)
                    progress(f"stream: {len(ours)} calls of each kind")
                    report("stream", plain, ours, ["p50", "mean"])

                async with ModelRecorder(
                    nc, source="bench", prefix=prefix, wait=False
                ) as pipelining:
                    fast = pipelining.model(provider)

                    async def pipelined() -> object:
                        return await fast.chat(PROMPT, model="bench-1")

                    plain, ours = await alternate(bare, pipelined, sizes)
                    await pipelining.flush()
                    assert not pipelining.failed, pipelining.failed
                    report("chat_pipelined", plain, ours, ["p50", "mean"])

                    kept = RecordedModel(provider, CallLog(agent="bench"))

                    async def unstored() -> object:
                        return await kept.chat(PROMPT, model="bench-1")

                    plain, ours = await alternate(bare, unstored, sizes)
                    report("chat_unstored", plain, ours, ["mean"])
            finally:
                await nc.close()
    progress("done")


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    args = parser(__doc__).parse_args(argv)
    run_benchmark(main(QUICK if args.quick else FULL))


if __name__ == "__main__":
    cli()
