"""Helpers shared by the tests (importable as `support`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable

import nats
import redis.asyncio as redis


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll `condition` until it is true; fail the test when `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition!r}")
        await asyncio.sleep(interval)


def run_fuse(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `fuse` as a user does (`python -m newfuse`, a real process); 200 columns wide."""
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", *args],
        capture_output=True,
        text=True,
        env={**(os.environ if env is None else env), "COLUMNS": "200"},
        input=stdin,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


# Every subject prefix handed out to tests this session (conftest's `prefix` fixture and any
# test that needs several): on servers the session did not start, the session's teardown removes
# exactly what lives under these prefixes, nothing else.
SESSION_PREFIXES: set[str] = set()


def new_prefix(letter: str = "t") -> str:
    """A subject prefix no other test uses, registered for the session's cleanup."""
    prefix = f"{letter}{uuid.uuid4().hex[:10]}"
    SESSION_PREFIXES.add(prefix)
    return prefix


def owned_by(stream_name: str, prefixes: Iterable[str]) -> bool:
    """Whether a JetStream stream (or KV/object bucket) was made under one of `prefixes`.

    The events stream is `<PREFIX>_EVENTS`; anything else newfuse names after a prefix starts
    with `<PREFIX>_`, and a bucket `<prefix>...` is stored as stream `KV_`/`OBJ_<prefix>...`.
    """
    for prefix in prefixes:
        upper = prefix.upper().replace("-", "_")
        for head in (f"{upper}_", f"KV_{prefix}", f"OBJ_{prefix}"):
            if stream_name.startswith(head):
                return True
    return False


async def remove_streams(nats_url: str, prefixes: Iterable[str]) -> list[str]:
    """Delete the streams (their consumers go with them) made under `prefixes`; names deleted."""
    chosen = set(prefixes)
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=10)
        names = [info.config.name for info in await js.streams_info()]
        doomed = [name for name in names if name and owned_by(name, chosen)]
        for name in doomed:
            await js.delete_stream(name)
    finally:
        await nc.close()
    return doomed


async def remove_keys(redis_url: str, prefixes: Iterable[str]) -> int:
    """Delete the Redis keys `<prefix>:...` of `prefixes` (every read-model root is one); count."""
    removed = 0
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    async with client:
        for prefix in set(prefixes):
            batch = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            for start in range(0, len(batch), 500):
                removed += await client.unlink(*batch[start : start + 500])
    return removed
