"""keep_alive: a server that dies comes back on its port with its data; one that cannot be
brought back is given up on with an error that says why."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from newfuse.errors import ServerStartError
from newfuse.nats.embedded import ServerRestart, ValkeyServer, find_valkey_server, keep_alive


async def test_a_killed_valkey_is_restarted_on_its_port_with_its_keys(tmp_path: Path) -> None:
    restarts: list[ServerRestart] = []
    async with ValkeyServer(binary=find_valkey_server(use_path=False), data_dir=tmp_path) as server:
        keeper = asyncio.create_task(keep_alive(server, restarts.append))
        client = aioredis.Redis.from_url(server.url)
        try:
            await client.set("kept", "yes")
            old_pid, port = server.pid, server.port
            assert old_pid is not None
            os.kill(old_pid, signal.SIGKILL)
            async with asyncio.timeout(20):
                while not restarts:
                    await asyncio.sleep(0.02)
            [restart] = restarts
            assert restart.old_pid == old_pid and restart.status == -signal.SIGKILL
            assert restart.new_pid == server.pid != old_pid and server.port == port
            assert "killed by SIGKILL; restarted as pid" in str(restart)
            await client.aclose()  # its pooled connection died with the old process
            client = aioredis.Redis.from_url(server.url)
            assert await client.get("kept") == b"yes"
        finally:
            await client.aclose()
            keeper.cancel()
            await asyncio.wait({keeper})
    assert keeper.cancelled()


async def test_keep_alive_gives_up_when_the_port_stays_taken(tmp_path: Path) -> None:
    server = ValkeyServer(binary=find_valkey_server(use_path=False), data_dir=tmp_path)
    async with server:
        assert server.pid is not None and server.port is not None
        os.kill(server.pid, signal.SIGKILL)
        while server.running:
            await asyncio.sleep(0.02)
        with socket.socket() as squatter:  # someone else takes the port meanwhile
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", server.port))
            squatter.listen()
            with pytest.raises(ServerStartError, match=r"not kept up: 3 failed or short-lived"):
                async with asyncio.timeout(60):
                    await keep_alive(server, lambda _: None, max_failures=3, backoff=0.01)
    assert not server.running


def test_a_state_file_whose_pid_now_belongs_to_another_process_counts_as_gone(
    tmp_path: Path,
) -> None:
    state = {
        "pid": os.getpid(),  # alive, but not the process that wrote the file
        "started": 1,
        "nats_url": "nats://127.0.0.1:1",
        "redis_url": "redis://127.0.0.1:1/0",
        "audit_db": str(tmp_path / "a.db"),
        "prefix": "fuse",
        "data_dir": str(tmp_path),
    }
    (tmp_path / "dev.json").write_bytes(msgspec.json.encode(state))
    env = {**os.environ, "FUSE_STATE_DIR": str(tmp_path)}
    for variable in ("FUSE_NATS_URL", "FUSE_REDIS_URL", "FUSE_STORE", "FUSE_AUDIT_DB"):
        env.pop(variable, None)
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", "replay"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"(pid {os.getpid()}) is gone" in result.stderr
