"""`fuse projections run --health` and `fuse dev --health` as real subprocesses: the printed URL
serves /healthz, /readyz and /metrics, the metrics count what was applied, FUSE_OTLP_ENDPOINT
exports to a collector, and the server ends with the process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis.asyncio as aioredis

from newfuse.eventstore import open_event_store
from newfuse.schemas import NewEvent, StateUpdate
from otlp_receiver import Receiver, receiver

__all__ = ["receiver"]  # the fixture

_URL = re.compile(r"^fuse: health on (http://\S+) \(/healthz, /readyz, /metrics\)$")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def health_url(process: subprocess.Popen[str]) -> str:
    """The URL the process prints on stderr (it prints its other lines first)."""
    assert process.stderr is not None
    for _ in range(10):
        line = process.stderr.readline()
        if found := _URL.match(line.strip()):
            return found.group(1)
    raise AssertionError("no health URL printed")


def poll(url: str, pattern: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        status, body = get(url)
        if status == 200 and re.search(pattern, body, re.MULTILINE):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{url} never matched {pattern!r}; last body:\n{body}")


async def test_projections_run_serves_health_and_exports_to_a_collector(
    nats_url: str, redis_url: str, prefix: str, tmp_path: Path, receiver: Receiver
) -> None:
    env = {**os.environ, "FUSE_OTLP_ENDPOINT": receiver.url}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "newfuse",
            "--nats",
            nats_url,
            "--redis",
            redis_url,
            "--prefix",
            prefix,
            "--audit-db",
            str(tmp_path / "read-models.db"),
            "projections",
            "run",
            "agent_state",
            "--health",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = health_url(process)
        assert get(f"{url}/healthz") == (200, "ok\n")
        async with await open_event_store(nats_url, prefix=prefix) as store:
            for n in range(1, 6):
                update = StateUpdate(agent_id="r1", state={"n": n}, version=n)
                await store.append("agent.r1", NewEvent(data=update))
        poll(f"{url}/metrics", r'^newfuse_projection_applied_total\{.*"agent_state".*\} 5\.0$')
        assert poll(f"{url}/readyz", "ok") == "store ok\nagent_state ok\n"
        # Under the prefix's own root, so the session's cleanup of a shared Redis finds them.
        client = aioredis.Redis.from_url(redis_url)
        async with client:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:proj:*")]
        assert f"{prefix}:proj:{{agent_state}}:g1:checkpoint".encode() in keys
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    try:
        status = get(f"{url}/healthz")[0]
    except urllib.error.URLError:
        status = None
    assert status is None  # nothing listens there any more
    # closing flushed the exporters: the collector has the counter and the batch spans
    assert max(receiver.sums("newfuse.projection.applied", "agent_state")) == 5
    assert "newfuse.projection.batch" in {span.name for _, span in receiver.spans()}


async def test_fuse_dev_serves_readiness_of_every_builtin_projection(tmp_path: Path) -> None:
    env = {**os.environ, "FUSE_STATE_DIR": str(tmp_path / "state")}
    for variable in ("FUSE_NATS_URL", "FUSE_REDIS_URL", "FUSE_STORE", "FUSE_AUDIT_DB"):
        env.pop(variable, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "newfuse", "dev", "--health", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        nats_url = process.stdout.readline().strip().removeprefix("FUSE_NATS_URL=")
        url = health_url(process)
        ready = poll(f"{url}/readyz", "ok")
        assert ready == "store ok\nagent_state ok\naudit ok\ntransactions ok\n"
        async with await open_event_store(nats_url) as store:
            update = StateUpdate(agent_id="r1", state={}, version=1)
            await store.append("agent.r1", NewEvent(data=update))
        poll(f"{url}/metrics", r'^newfuse_projection_applied_total\{.*"audit".*\} 1\.0$')
        poll(f"{url}/metrics", r'^newfuse_projection_applied_total\{.*"agent_state".*\} 1\.0$')
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
