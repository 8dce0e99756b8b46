"""What every benchmark script shares: progress on stderr, result lines on stdout, timing."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

_START = time.monotonic()


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


def run_benchmark(coroutine: Awaitable[None]) -> None:
    """Run the benchmark on uvloop, as the CLI does."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)  # type: ignore[arg-type]
    else:
        uvloop.run(coroutine)  # type: ignore[arg-type]
