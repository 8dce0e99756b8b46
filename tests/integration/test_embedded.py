"""The embedded launchers start real servers, answer, stop cleanly and quote logs on failure."""

from __future__ import annotations

import os
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis

from newfuse.errors import ServerNotFoundError, ServerStartError
from newfuse.nats.embedded import NatsServer, ValkeyServer, find_nats_server, find_valkey_server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_nats_server_starts_with_jetstream_and_stops_leaving_no_process(
    tmp_path: Path,
) -> None:
    server = NatsServer(binary=find_nats_server(use_path=False), data_dir=tmp_path)
    async with server:
        assert server.url.startswith("nats://127.0.0.1:")
        pid = server.pid
        assert pid is not None and _alive(pid)
        nc = await nats.connect(server.url)
        info = await nc.jetstream().account_info()
        assert info.streams == 0
        await nc.close()
    assert not _alive(pid)
    assert "Server is ready" in server.log_path.read_text()


async def test_valkey_server_starts_answers_and_stops_leaving_no_process(tmp_path: Path) -> None:
    server = ValkeyServer(binary=find_valkey_server(use_path=False), data_dir=tmp_path)
    async with server:
        pid = server.pid
        assert pid is not None
        client = aioredis.Redis.from_url(server.url)
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        await client.aclose()
    assert not _alive(pid)


async def test_nats_server_with_a_bad_option_fails_quoting_its_log(tmp_path: Path) -> None:
    config = tmp_path / "bad.conf"
    config.write_text("jetstream { max_memory_store: not-a-size }\n")
    server = NatsServer(
        binary=find_nats_server(use_path=False), data_dir=tmp_path, extra_args=["-c", str(config)]
    )
    with pytest.raises(ServerStartError, match=r"(?s)nats-server did not start.*log:.*bad\.conf"):
        await server.start()
    assert not server.running


async def test_valkey_server_with_a_bad_option_fails_quoting_its_log(tmp_path: Path) -> None:
    server = ValkeyServer(
        binary=find_valkey_server(use_path=False),
        data_dir=tmp_path,
        extra_args=["--maxmemory-policy", "no-such-policy"],
    )
    with pytest.raises(ServerStartError, match=r"(?s)valkey-server did not start.*maxmemory"):
        await server.start()


async def test_nats_server_restarts_on_the_same_port_after_a_kill(tmp_path: Path) -> None:
    server = NatsServer(binary=find_nats_server(use_path=False), data_dir=tmp_path)
    async with server:
        url = server.url
        await server.kill()
        assert not server.running
        await server.restart()
        assert server.url == url
        nc = await nats.connect(url)
        assert nc.is_connected
        await nc.close()


def test_an_explicit_binary_that_does_not_exist_is_named_in_the_error() -> None:
    with pytest.raises(ServerNotFoundError, match=r"FUSE_NATS_SERVER=/nope/nats-server"):
        find_nats_server({"FUSE_NATS_SERVER": "/nope/nats-server"})
