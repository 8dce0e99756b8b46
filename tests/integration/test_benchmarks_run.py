"""Each benchmark runs end to end (`--quick`) and prints every line it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

EVENTSTORE_LINES = {
    "jetstream.append.concurrent",
    "jetstream.append.latency.p50",
    "jetstream.append.latency.p99",
    "jetstream.read_all.vs_ordered_push",
    "jetstream.read_all.vs_pull_fetch",
    "sqlite.append.concurrent",
    "sqlite.append.single",
    "sqlite.append.concurrent.normal",
    "sqlite.append.single.normal",
    "sqlite.append.inline_commit.p50",
    "sqlite.append.inline_commit.p99",
    "sqlite.read_all",
    "sqlite.read_stream",
    "jetstream.replay.peak_rss",
    "sqlite.replay.peak_rss",
    "cluster.append.r3",
    "cluster.append.r1_vs_r3",
    "cluster.append.leader_kill.longest_wait",
    "cluster.append.r3_sync_always",
}

PROJECTION_LINES = {
    f"{store}.{line}"
    for store in ("jetstream", "sqlite")
    for line in (
        "agent_state.rebuild",
        "agent_state.rebuild.vs_hset_only",
        "audit.rebuild",
        "audit.rebuild.vs_executemany_only",
    )
} | {f"{model}.lag.{p}" for model in ("agent_state", "audit") for p in ("p50", "p99")}


A2A_LINES = {
    "a2a.fan_in",
    "a2a.fan_in.64",
    "a2a.fan_in.256",
    "a2a.instances.1",
    "a2a.instances.3",
    *(f"a2a.round_trip.{path}.{p}" for path in ("fast_path", "log") for p in ("p50", "p99")),
}

CRYPTO_LINES = {
    f"crypto.{backend}{line}"
    for backend in ("", "sqlite.")
    for line in (
        "append.latency.p50",
        "append.concurrent",
        "append.concurrent.cpu",
        "read_all",
        "read_all.cpu",
    )
}

TASK_LINES = {
    *(f"tasks.throughput.workers_{n}" for n in (1, 2, 4)),
    "tasks.priority0_wait.p99",
}

SAGA_LINES = {
    *(f"sagas.latency.{p}" for p in ("p50", "p99")),
    "sagas.throughput",
    "sagas.end.p50",
    *(f"sagas.deadlock_detection.{p}" for p in ("p50", "p99")),
}
AUDIT_LINES = {"audit.checkpoint.jetstream", "audit.verify.jetstream", "audit.verify.sqlite"}
SIGNER_LINES = {"jetstream.read_all.signers_checked", "jetstream.read.signers_checked"}
AGENT_SEALING_LINES = {
    f"agent_sealing{bus}.{what}.{p}"
    for bus in ("", ".secured")
    for what in ("round_trip", "task_submit")
    for p in ("p50", "p99")
}


@pytest.mark.parametrize(
    ("script", "expected_names"),
    [
        ("eventstore.py", EVENTSTORE_LINES),
        ("projections.py", PROJECTION_LINES),
        ("a2a.py", A2A_LINES),
        ("crypto.py", CRYPTO_LINES),
        ("tasks.py", TASK_LINES),
        ("sagas.py", SAGA_LINES),
        ("audit.py", AUDIT_LINES),
        ("signers.py", SIGNER_LINES),
        ("agent_sealing.py", AGENT_SEALING_LINES),
    ],
)
def test_quick_run_prints_one_json_line_per_measurement_with_numeric_fields(
    script: str, expected_names: set[str]
) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    names = [line["name"] for line in lines]
    assert sorted(names) == sorted(expected_names), done.stderr
    for line in lines:
        assert set(line) >= {"name", "ours", "baseline", "unit", "ratio", "n"}, line
        for field in ("ours", "baseline", "ratio"):
            value = line[field]
            assert isinstance(value, int | float) and not isinstance(value, bool), line
            assert math.isfinite(value) and value > 0, line
        assert isinstance(line["unit"], str) and line["unit"], line
        assert isinstance(line["n"], int) and line["n"] > 0, line
    for line in lines:
        if ".lag." in line["name"]:
            # The load the lag was measured under, achieved by each side's round.
            for field in ("rate", "baseline_rate"):
                assert isinstance(line[field], int | float) and line[field] > 0, line
    for line in lines:
        if line["name"].startswith("a2a.instances."):
            # Each instance's share of the work: every one took some, together all of it.
            assert len(line["shares"]) == int(line["name"].rsplit(".", 1)[1]), line
            assert all(share > 0 for share in line["shares"]), line
            assert math.isclose(sum(line["shares"]), 1.0, abs_tol=0.01), line
    assert "done" in done.stderr


def test_the_crypto_steps_table_names_each_step_of_a_sealed_read_with_its_cost() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "crypto.py"), "--quick", "--steps"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.rsplit(None, 2) for line in done.stdout.splitlines() if line.strip()]
    assert [label.strip() for label, _, _ in rows][:2] == [
        "decode, plain event (all of it)",
        "decode, sealed event (all of it)",
    ]
    assert any("AES-256-GCM decrypt" in label for label, _, _ in rows)
    assert all(unit == "us" and float(us) > 0 for _, us, unit in rows), done.stdout
