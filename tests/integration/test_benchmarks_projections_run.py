"""The projections benchmark runs end to end (`--quick`) and prints every line it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "projections.py"

EXPECTED_NAMES = {
    f"{store}.{line}"
    for store in ("jetstream", "sqlite")
    for line in (
        "agent_state.rebuild",
        "agent_state.rebuild.vs_hset_only",
        "audit.rebuild",
        "audit.rebuild.vs_executemany_only",
    )
} | {f"{model}.lag.{p}" for model in ("agent_state", "audit") for p in ("p50", "p99")}


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
        assert set(line) >= {"name", "ours", "baseline", "unit", "ratio", "n"}, line
        for field in ("ours", "baseline", "ratio"):
            value = line[field]
            assert isinstance(value, int | float) and not isinstance(value, bool), line
            assert math.isfinite(value) and value > 0, line
        assert isinstance(line["unit"], str) and line["unit"], line
        assert isinstance(line["n"], int) and line["n"] > 0, line
    lags = [line for line in lines if ".lag." in line["name"]]
    for line in lags:
        # The load the lag was measured under, achieved by each side's round.
        for field in ("rate", "baseline_rate"):
            assert isinstance(line[field], int | float) and line[field] > 0, line
    assert "done" in done.stderr
