"""What every benchmark script shares: sizes, progress, result lines, timing, child processes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_START = time.monotonic()

# -- sizes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much each phase does; `--quick` is a smoke run of a few seconds."""

    streams: int  # JetStream appenders in flight (one stream each)
    append_events: int  # events per JetStream throughput round
    latency_events: int  # sequential appends for the latency percentiles
    read_events: int  # events in the JetStream read_all phase
    sqlite_appenders: int  # concurrent SQLite appenders (tasks for us, threads for eventsourcing)
    sqlite_append_events: int  # events per concurrent SQLite round
    sqlite_single_events: int  # events per single-appender SQLite round
    sqlite_read_events: int  # events in the SQLite read phase
    sqlite_stream_size: int  # events per stream in the SQLite read phase
    replay_events: int  # events replayed for the peak-RSS measurement
    rebuild_events: int  # StateUpdate events in the JetStream log that the rebuilds replay
    rebuild_agents: int  # agents (one stream `agent.<id>` each) those events are spread over
    rebuild_sqlite_events: int  # the same, in a SQLite event store (the cheaper second figure)
    lag_rate: int  # events/s appended during the lag phase
    lag_seconds: float  # measured seconds of load per side
    lag_warmup: float  # seconds of load before sampling starts
    rounds: int  # measured rounds per side (after one warm-up)
    cluster_events: int  # events per round on the 3-node cluster
    cluster_kill_seconds: float  # seconds of load around the stream-leader kill


FULL = Sizes(
    streams=256,
    append_events=50_000,
    latency_events=5_000,
    read_events=200_000,
    sqlite_appenders=16,
    sqlite_append_events=20_000,
    sqlite_single_events=4_000,
    sqlite_read_events=100_000,
    sqlite_stream_size=500,
    replay_events=1_000_000,
    rebuild_events=200_000,
    rebuild_agents=1_000,
    rebuild_sqlite_events=200_000,
    lag_rate=5_000,
    lag_seconds=10.0,
    lag_warmup=1.0,
    rounds=3,
    cluster_events=20_000,
    cluster_kill_seconds=12.0,
)
QUICK = Sizes(
    streams=32,
    append_events=1_000,
    latency_events=200,
    read_events=3_000,
    sqlite_appenders=8,
    sqlite_append_events=400,
    sqlite_single_events=100,
    sqlite_read_events=2_000,
    sqlite_stream_size=100,
    replay_events=10_000,
    rebuild_events=4_000,
    rebuild_agents=40,
    rebuild_sqlite_events=2_000,
    lag_rate=5_000,
    lag_seconds=2.0,
    lag_warmup=0.3,
    rounds=1,
    cluster_events=1_000,
    cluster_kill_seconds=8.0,
)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The command line every benchmark accepts (`--quick`); a script adds its own options."""
    result = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    result.add_argument("--quick", action="store_true", help="a small smoke run (a few seconds)")
    return result


def sizes_of(args: argparse.Namespace) -> Sizes:
    return QUICK if args.quick else FULL


@contextlib.asynccontextmanager
async def workdir(label: str) -> AsyncIterator[Path]:
    """A temp directory for one run's files (servers' data, SQLite files), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"newfuse-bench-{label}-"))
    try:
        yield path
    finally:
        await asyncio.to_thread(shutil.rmtree, path, True)


def progress(message: str) -> None:
    """One line of progress on stderr, with the seconds since start."""
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def emit(
    name: str,
    ours: float,
    baseline: float,
    unit: str,
    *,
    n: int,
    lower_is_better: bool,
    **extra: Any,
) -> None:
    """Print one result line; the ratio is always oriented so that higher is better."""
    if lower_is_better:
        ratio = baseline / ours if ours else 0.0
    else:
        ratio = ours / baseline if baseline else 0.0
    line = {
        "name": name,
        "ours": round(ours, 3),
        "baseline": round(baseline, 3),
        "unit": unit,
        "ratio": round(ratio, 3),
        "n": n,
        **extra,
    }
    print(json.dumps(line), flush=True)


async def timed(run: Callable[[], Awaitable[int]]) -> tuple[int, float]:
    """Run once; (items done, seconds)."""
    start = time.perf_counter()
    count = await run()
    return count, time.perf_counter() - start


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def run_id() -> str:
    """A short id that keeps one run's subjects and keys apart from another's."""
    return uuid.uuid4().hex[:8]


def run_benchmark(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run the benchmark on uvloop, as the CLI does."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


# -- child processes -------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(values: dict[str, Any]) -> None:
    """A child's result: one JSON line on stdout, read back by `run_child`."""
    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()


async def run_child(script: str, *args: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """Run `python script args...` and return the JSON object on its last stdout line.

    The child is killed if the wait is cancelled or times out, so none outlives the benchmark.
    """
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await child.communicate()
    except BaseException:
        if child.returncode is None:
            child.kill()
            await child.wait()
        raise
    if child.returncode != 0:
        raise RuntimeError(
            f"{Path(script).name} child failed ({child.returncode}):\n{err.decode()}"
        )
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result
