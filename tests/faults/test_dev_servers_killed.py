"""`fuse dev` keeps its servers: a SIGKILLed nats-server or valkey comes back on its port with
its data and the projections catch up; status keeps every row with one read model down; a
killed `fuse dev` gives a fast error naming it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from newfuse.nats.embedded import free_port
from support import dev_environment

pytestmark = pytest.mark.faults


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def _wait(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


class Dev:
    """A `fuse dev` subprocess with its stderr in a file (read while it runs)."""

    def __init__(self, tmp_path: Path) -> None:
        self.env = dev_environment(tmp_path / "state", COLUMNS="300")
        self.state_file = tmp_path / "state" / "dev.json"
        self.stderr_path = tmp_path / "dev.stderr"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "newfuse", "dev", "--data-dir", str(tmp_path / "data")],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=self.env,
                text=True,
            )
        assert self.process.stdout is not None
        self.urls = dict(self.process.stdout.readline().strip().split("=", 1) for _ in range(3))

    def state(self) -> dict[str, object]:
        return dict(json.loads(self.state_file.read_text()))

    def servers(self) -> dict[str, dict[str, object]]:
        return {s["name"]: s for s in self.state()["servers"]}  # type: ignore[attr-defined]

    def fuse(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "newfuse", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def publish(self, agent: str, version: int) -> int:
        data = json.dumps({"agentId": agent, "state": {"v": version}, "version": version})
        out = self.fuse("publish", f"agent.{agent}", "agent.state_update", "--data", data, "--json")
        return int(json.loads(out.stdout)["position"])

    def statuses(self) -> list[dict[str, object]]:
        out = self.fuse("projections", "status", "--json").stdout  # JSON Lines
        return [json.loads(line) for line in out.splitlines()]

    def caught_up(self, head: int) -> list[dict[str, object]]:
        found: list[dict[str, object]] = []

        def done() -> bool:
            found[:] = self.statuses()
            return all(s["checkpoint"] == head for s in found)

        _wait(done, f"projections at {head}")
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=60)


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    running = Dev(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_killed_nats_and_valkey_come_back_on_their_ports_with_their_data_and_projections_catch_up(
    dev: Dev,
) -> None:
    positions = [dev.publish("r1", version) for version in (1, 2, 3)]
    dev.caught_up(positions[-1])
    before = dev.servers()
    assert set(before) == {"nats-server", "valkey-server"}
    for name in ("nats-server", "valkey-server"):
        old_pid = before[name]["pid"]
        assert isinstance(old_pid, int) and _alive(old_pid)
        os.kill(old_pid, signal.SIGKILL)
        _wait(lambda name=name: dev.servers()[name]["restarts"] == 1, f"{name} restarted")
        after = dev.servers()[name]
        assert after["pid"] != old_pid and _alive(int(after["pid"]))  # type: ignore[call-overload]
        assert after["url"] == before[name]["url"] and after["last_exit"] == "killed by SIGKILL"
        said = dev.stderr_path.read_text()
        assert f"{name} pid {old_pid} killed by SIGKILL; restarted as pid {after['pid']}" in said
        # the data survived: the log's events, the agent's state from before the kill
        replayed = dev.fuse("replay", "--json").stdout.splitlines()
        assert len(replayed) >= 3
        state = json.loads(dev.fuse("agents", "state", "r1", "--json").stdout)
        assert state["version"] >= 3
        positions.append(dev.publish("r1", len(positions) + 1))
        statuses = dev.caught_up(positions[-1])
        assert all(s["last_error"] is None for s in statuses), statuses
    assert dev.process.poll() is None
    state = json.loads(dev.fuse("agents", "state", "r1", "--json").stdout)
    assert state["version"] == 5 and state["state"] == {"v": 5}
    audit = dev.fuse("audit", "--json").stdout.splitlines()
    assert [json.loads(row)["position"] for row in audit] == positions


def test_status_keeps_every_row_when_one_read_model_is_down(dev: Dev) -> None:
    head = dev.publish("r2", 1)
    dev.caught_up(head)
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    result = dev.fuse("--redis", dead_redis, "projections", "status", "--json")
    rows = {row["name"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {"agent_state", "audit", "transactions"}
    down = rows["agent_state"]
    assert down["state"] == "unavailable" and down["checkpoint"] is None
    assert dead_redis in str(down["last_error"]) and "unavailable" in str(down["last_error"])
    assert rows["audit"]["checkpoint"] == head and rows["audit"]["last_error"] is None
    table = dev.fuse("--redis", dead_redis, "projections", "status").stdout
    assert re.search(r"agent_state +unavailable", table) and "audit" in table


def test_a_killed_fuse_dev_fails_fast_naming_its_pid_and_state_file(dev: Dev) -> None:
    server_pids = [int(s["pid"]) for s in dev.servers().values()]  # type: ignore[call-overload]
    dev.process.send_signal(signal.SIGKILL)
    dev.process.wait(timeout=10)
    _wait(lambda: not any(_alive(pid) for pid in server_pids), "its servers gone with it")
    # a connect timeout of 50 s: a command that tried to connect before it looked at the state
    # file would take that long; one that looks first ends in well under half of it, however
    # loaded the machine is
    dev.env["FUSE_CONNECT_TIMEOUT"] = "50"
    for command in (("replay",), ("projections", "status"), ("agents", "state")):
        started = time.monotonic()
        result = dev.fuse(*command, check=False)
        elapsed = time.monotonic() - started
        assert result.returncode == 1
        assert (
            f"the `fuse dev` recorded in {dev.state_file} (pid {dev.process.pid}) is gone"
            in result.stderr
        )
        assert "start `fuse dev` again" in result.stderr and "Traceback" not in result.stderr
        assert elapsed < 25.0, f"{command}: {elapsed:.1f}s (the connect timeout is 50 s)"
