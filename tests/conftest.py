"""Session fixtures: real nats-server (JetStream) and valkey-server, started from the wheels.

FUSE_NATS_URL / FUSE_REDIS_URL point the suite at servers that already run; otherwise the
session starts its own on free loopback ports and stops exactly those processes at the end.
Tests isolate themselves by subject prefix (`prefix` fixture, `support.new_prefix`), not by
server; on servers the session did not start, its teardown deletes the streams (with their
consumers), buckets and Redis keys under the prefixes it handed out, and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from newfuse.nats.embedded import NatsServer, ValkeyServer, find_nats_server, find_valkey_server
from support import SESSION_PREFIXES, new_prefix, remove_keys, remove_streams

pytest_plugins = ["cluster_support"]

if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest-xdist sets COLUMNS=80 in its workers; the CLI's tables in the tests' subprocesses
    # are then cut to 80 columns, unlike in a serial run (off a terminal: 160)
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


@pytest.fixture(scope="session")
async def nats_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """URL of the session's NATS server with JetStream."""
    if url := os.environ.get("FUSE_NATS_URL"):
        yield url
        await remove_streams(url, SESSION_PREFIXES)
        return
    binary = find_nats_server(use_path=False)
    async with NatsServer(binary=binary, data_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server.url


@pytest.fixture(scope="session")
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """URL of the session's Redis-protocol server (valkey)."""
    if url := os.environ.get("FUSE_REDIS_URL"):
        yield url
        await remove_keys(url, SESSION_PREFIXES)
        return
    binary = find_valkey_server(use_path=False)
    async with ValkeyServer(binary=binary, data_dir=tmp_path_factory.mktemp("valkey")) as server:
        yield server.url


@pytest.fixture
def prefix() -> str:
    """A subject prefix no other test uses, so tests can share one server."""
    return new_prefix()


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A NATS server of this test's own, for tests that kill and restart it."""
    server = NatsServer(binary=find_nats_server(use_path=False), data_dir=tmp_path / "nats")
    async with server:
        yield server


@pytest.fixture
async def valkey_server(tmp_path: Path) -> AsyncIterator[ValkeyServer]:
    """A valkey server of this test's own, for tests that kill and restart it."""
    server = ValkeyServer(binary=find_valkey_server(use_path=False), data_dir=tmp_path / "valkey")
    async with server:
        yield server
