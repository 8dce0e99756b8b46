"""Projection benchmarks: rebuilds, then steady-state lag (what `make bench-projections` runs).

Each path is its own script (rebuild, projection_lag) and runs alone too. Every measurement runs
our code and its baseline on the same servers, on the same events, after a warm-up, in
alternating rounds (the best round of each side is kept). Progress goes to stderr; results go to
stdout as JSON lines with the keys name, ours, baseline, unit, ratio and n, where ratio is
ours / baseline for throughput and baseline / ours for latency (so higher is always better).

Usage: `python benchmarks/projections.py [--quick]` (see benchmarks/README.md).
"""

from __future__ import annotations

import projection_lag
import rebuild
from _harness import Sizes, parser, progress, run_benchmark, sizes_of


async def main(sizes: Sizes) -> None:
    await rebuild.main(sizes)
    await projection_lag.main(sizes)
    progress("done")


if __name__ == "__main__":
    run_benchmark(main(sizes_of(parser(__doc__).parse_args())))
