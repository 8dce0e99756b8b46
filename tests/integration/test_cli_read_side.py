"""The read side from the command line, as a user runs it against `fuse dev`: events published
with `fuse publish` show up in `fuse agents state`, `fuse audit` and `fuse projections status`
without another step; raw SQL is read-only; a rebuild keeps the answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import dev_environment, start_fuse_dev


@pytest.fixture
def dev_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dev_environment(tmp_path / "state", COLUMNS="200")
    with start_fuse_dev(env, "dev"):
        yield env


def fuse(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def wait_caught_up(env: dict[str, str], head: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 20
    while True:
        out = fuse(env, "projections", "status", "--json").stdout
        statuses = [json.loads(line) for line in out.splitlines()]
        if all(status["checkpoint"] >= head for status in statuses):
            return list(statuses)
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)


def test_published_events_reach_agent_state_audit_and_status(dev_env: dict[str, str]) -> None:
    env = dev_env
    fuse(
        env,
        "publish",
        "agent.r1",
        "agent.state_update",
        "--data",
        '{"agentId": "r1", "state": {"step": "plan"}, "version": 2}',
        "--correlation",
        "c-7",
    )
    fuse(
        env,
        "publish",
        "agent.r1",
        "agent.state_update",
        "--data",
        '{"agentId": "r1", "state": {"step": "stale"}, "version": 1}',
    )
    message = (
        '{"type": "task.request", "payload": {"q": 1}, '
        '"metadata": {"sender": "planner", "timestamp": "2026-11-24T10:00:00Z"}}'
    )
    last = json.loads(
        fuse(env, "publish", "inbox.r1", "a2a.message", "--data", message, "--json").stdout
    )
    statuses = wait_caught_up(env, last["position"])
    assert {s["name"] for s in statuses} == {"agent_state", "audit", "transactions"}
    assert all(
        {
            "name",
            "checkpoint",
            "head",
            "lag_events",
            "lag_seconds",
            "events_per_second",
            "dead_letters",
            "last_error",
        }
        <= set(s)
        for s in statuses
    )
    assert all(s["lag_events"] == 0 and s["dead_letters"] == 0 for s in statuses)
    # each runner's consumer sits on the dev's one nats-server, which status names
    assert {s["server"] for s in statuses} == {"newfuse-embedded"}

    state = json.loads(fuse(env, "agents", "state", "r1", "--json").stdout)
    assert state["state"] == {"step": "plan"} and state["version"] == 2  # the stale one ignored
    missing = fuse(env, "agents", "state", "nobody", check=False)
    assert missing.returncode == 1 and "nobody" in missing.stderr

    rows = [json.loads(line) for line in fuse(env, "audit", "--json").stdout.splitlines()]
    assert [row["position"] for row in rows] == [1, 2, 3]
    assert rows[0]["correlation_id"] == "c-7" and rows[2]["sender"] == "planner"
    assert list(rows[0])[:7] == [
        "position",
        "id",
        "stream",
        "category",
        "type",
        "schema_version",
        "timestamp",
    ]
    assert rows[0]["timestamp"].endswith("Z") and rows[2]["data"]["type"] == "task.request"
    by_correlation = fuse(env, "audit", "--correlation", "c-7", "--json").stdout.splitlines()
    assert len(by_correlation) == 1
    table = fuse(env, "audit", "--type", "a2a.message").stdout
    assert "inbox.r1" in table and "agent.r1" not in table

    counted = fuse(
        env, "audit", "sql", "SELECT type, count(*) AS n FROM audit_events GROUP BY 1", "--json"
    ).stdout.splitlines()
    assert sorted(json.loads(line)["n"] for line in counted) == [1, 2]
    refused = fuse(env, "audit", "sql", "DELETE FROM audit_events", check=False)
    assert refused.returncode == 1 and "refused" in refused.stderr
    assert len(fuse(env, "audit", "--json").stdout.splitlines()) == 3

    rebuilt = json.loads(fuse(env, "projections", "rebuild", "agent_state", "--json").stdout)
    assert rebuilt["applied"] == 3 and rebuilt["new_generation"] > rebuilt["old_generation"]
    state = json.loads(fuse(env, "agents", "state", "r1", "--json").stdout)
    assert state["state"] == {"step": "plan"} and state["version"] == 2

    unknown = fuse(env, "projections", "rebuild", "nope", check=False)
    assert unknown.returncode == 1 and "no projection named 'nope'" in unknown.stderr


def test_commands_use_the_prefix_of_the_running_fuse_dev(tmp_path: Path) -> None:
    env = dev_environment(tmp_path / "state")
    with start_fuse_dev(env, "--prefix", "team-a", "dev"):
        fuse(env, "publish", "agent.r1", "note", "--data", "{}")
        assert len(fuse(env, "replay", "--json").stdout.splitlines()) == 1
        assert len(fuse(env, "--prefix", "team-a", "replay", "--json").stdout.splitlines()) == 1
        other = fuse(env, "--prefix", "fuse", "replay", "--json", check=False)
        assert other.returncode == 1 and "prefix 'team-a'" in other.stderr
