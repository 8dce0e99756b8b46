"""The event store benchmark runs end to end (`--quick`) and prints every line it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eventstore.py"

EXPECTED_NAMES = {
    "jetstream.append.concurrent",
    "jetstream.append.latency.p50",
    "jetstream.append.latency.p99",
    "jetstream.read_all.vs_ordered_push",
    "jetstream.read_all.vs_pull_fetch",
    "sqlite.append.concurrent",
    "sqlite.append.single",
    "sqlite.read_all",
    "sqlite.read_stream",
    "jetstream.replay.peak_rss",
    "sqlite.replay.peak_rss",
}


def test_quick_run_prints_one_json_line_per_measurement_with_numeric_fields() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    names = [line["name"] for line in lines]
    assert sorted(names) == sorted(EXPECTED_NAMES), done.stderr
    for line in lines:
        assert set(line) >= {"name", "ours", "baseline", "unit", "ratio"}, line
        for field in ("ours", "baseline", "ratio"):
            value = line[field]
            assert isinstance(value, int | float) and not isinstance(value, bool), line
            assert math.isfinite(value) and value > 0, line
        assert isinstance(line["unit"], str) and line["unit"], line
    assert "done" in done.stderr
