"""`fuse replay`, `fuse tail` and `fuse dev` as real processes next to a hostile publisher: each
reports the bad message's position on stderr and goes on with the honest events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

from support import dev_environment, start_fuse_dev

DEEP = b"[" * 5000 + b"]" * 5000


def _deep_envelope(stream: str, version: int) -> bytes:
    return (
        b'{"id":"deep","stream":"%s","type":"agent.state_update","version":%d,'
        b'"timestamp":"2026-12-02T12:00:00Z","data":%s}' % (stream.encode(), version, DEEP)
    )


def _fuse(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "newfuse", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def test_replay_and_tail_report_a_deep_envelope_and_go_on(nats_url: str, prefix: str) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    flags = ["--nats", nats_url, "--prefix", prefix]
    assert _fuse(env, *flags, "publish", "agent.c1", "note", "--data", '{"n": 1}').returncode == 0
    nc = await nats.connect(nats_url)
    bad = await nc.jetstream().publish(f"{prefix}.ev.agent.c1", _deep_envelope("agent.c1", 2))
    await nc.close()
    assert _fuse(env, *flags, "publish", "agent.c1", "note", "--data", '{"n": 2}').returncode == 0

    replay = _fuse(env, *flags, "replay", "--json")
    assert replay.returncode == 0, replay.stderr
    lines = [json.loads(line) for line in replay.stdout.splitlines()]
    assert [(line["version"], line["data"]["n"]) for line in lines] == [(1, 1), (2, 2)]
    assert f"position {bad.seq}" in replay.stderr and "MAX_NESTING_DEPTH" in replay.stderr

    tail = subprocess.Popen(
        [sys.executable, "-m", "newfuse", *flags, "tail", "--json", "--from-position", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert tail.stdout is not None
        assert json.loads(tail.stdout.readline())["data"] == {"n": 1}
        assert json.loads(tail.stdout.readline())["data"] == {"n": 2}
    finally:
        tail.send_signal(signal.SIGINT)
        _, stderr = tail.communicate(timeout=30)
    assert tail.returncode == 0, stderr
    assert f"position {bad.seq}" in stderr


async def test_fuse_dev_keeps_projecting_after_a_deep_envelope(tmp_path: Path) -> None:
    env = dev_environment(tmp_path / "state", COLUMNS="200")
    with start_fuse_dev(env, "dev", "--data-dir", str(tmp_path / "data")) as dev:
        nc = await nats.connect(dev.urls["FUSE_NATS_URL"])
        await nc.jetstream().publish("fuse.ev.agent.d1", _deep_envelope("agent.d1", 1))
        await nc.close()
        update = '{"agentId": "d1", "state": {"step": "after"}, "version": 1}'
        published = _fuse(env, "publish", "agent.d1", "agent.state_update", "--data", update)
        assert published.returncode == 0, published.stderr
        deadline = time.monotonic() + 30
        while True:
            state = _fuse(env, "agents", "state", "d1", "--json")
            if state.returncode == 0 and '"after"' in state.stdout:
                break
            assert dev.process.poll() is None, dev.process.communicate(timeout=30)
            assert time.monotonic() < deadline, state.stdout + state.stderr
            time.sleep(0.2)
        assert dev.process.poll() is None
