"""`fuse dev` as a real subprocess: prints both URLs, both answer, SIGTERM stops everything."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import nats
import redis.asyncio as aioredis

from support import dev_environment, start_fuse_dev


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purpose once its parent reaped it
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def test_fuse_dev_serves_nats_and_redis_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    env = dev_environment(tmp_path / "state")
    with start_fuse_dev(env, "dev", "--data-dir", str(tmp_path / "data")) as dev:
        urls = dev.urls
        assert Path(urls["FUSE_AUDIT_DB"]).exists()
        nc = await nats.connect(urls["FUSE_NATS_URL"])
        # provisioned: the log for the projections, the keys' bucket for sealed fields
        names = {info.config.name for info in await nc.jetstream().streams_info()}
        assert names == {"FUSE_EVENTS", "KV_fuse_keys"}
        await nc.close()
        client = aioredis.Redis.from_url(urls["FUSE_REDIS_URL"])
        assert await client.ping()
        await client.aclose()
        state = msgspec.json.decode((tmp_path / "state" / "dev.json").read_bytes())
        assert state["nats_url"] == urls["FUSE_NATS_URL"]
        children = _children(dev.process.pid)
        assert len(children) == 2
        second = subprocess.run(
            [sys.executable, "-m", "newfuse", "dev"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"a `fuse dev` already runs (pid {dev.process.pid}" in second.stderr
        assert (tmp_path / "state" / "dev.json").exists()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(_alive(pid) for pid in children)
    assert not (tmp_path / "state" / "dev.json").exists()


def test_a_command_needing_servers_says_when_no_fuse_dev_runs(tmp_path: Path) -> None:
    env = {**os.environ, "FUSE_STATE_DIR": str(tmp_path)}
    for variable in ("FUSE_NATS_URL", "FUSE_REDIS_URL", "FUSE_STORE"):
        env.pop(variable, None)
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", "replay"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no running `fuse dev` found" in result.stderr
    assert "FUSE_NATS_URL" in result.stderr
