"""Helpers shared by the tests (importable as `support`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import nats
import redis.asyncio as redis
from nats.aio.client import Client

from newfuse.agents.secure import provision
from newfuse.eventstore import open_event_store
from newfuse.nats import NatsServer, Subjects, connect
from newfuse.schemas import PermissionDenied
from newfuse.security import KeyService, KVKeyStore
from newfuse.security.identities import IdentityStore, server_config
from newfuse.security.key_service import Topics


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


def reap(process: subprocess.Popen[str]) -> None:
    """Kill `process` if it still runs, wait for it, close its stderr: a test's `finally`."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
    if process.stderr is not None:
        process.stderr.close()


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


# What points a command at servers; a reader of the README with only `fuse dev` running has none.
SERVER_VARIABLES = (
    "FUSE_NATS_URL",
    "FUSE_NATS_CA",
    "FUSE_REDIS_URL",
    "FUSE_STORE",
    "FUSE_AUDIT_DB",
    "FUSE_PREFIX",
)


def dev_environment(state_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without SERVER_VARIABLES, its `fuse dev` state in `state_dir`."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}
    return {**env, "FUSE_STATE_DIR": str(state_dir), **extra}


@dataclass(frozen=True)
class FuseDev:
    process: subprocess.Popen[str]
    urls: dict[str, str]  # FUSE_NATS_URL, FUSE_REDIS_URL, FUSE_AUDIT_DB as it printed them


@contextmanager
def start_fuse_dev(
    env: dict[str, str], *args: str, stderr: int | IO[str] = subprocess.PIPE
) -> Iterator[FuseDev]:
    """`python -m newfuse <args>` (a `fuse dev`) until its URLs are printed; SIGTERM on exit.

    When the body passed, the process must have exited 0 (its stderr is the assertion message).
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "newfuse", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(3)]
        names = [line.split("=", 1)[0] for line in lines]
        assert names == ["FUSE_NATS_URL", "FUSE_REDIS_URL", "FUSE_AUDIT_DB"], lines
        yield FuseDev(process, dict(line.split("=", 1) for line in lines))
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors


@asynccontextmanager
async def secured_nats(folder: Path, identities: IdentityStore) -> AsyncIterator[NatsServer]:
    """A nats-server under `folder` that lets in `identities` with their permissions (prefix
    `fuse`), with what their agents read made for them by the first admin (`provision`)."""
    config = folder / "auth.conf"
    config.write_text(server_config(identities.list(), Subjects("fuse")))
    async with NatsServer(data_dir=folder / "nats", extra_args=["--config", str(config)]) as server:
        admin_name = next(i.name for i in identities.list() if i.role == "admin")
        admin = await connect(server.url, credentials=identities.credentials(admin_name))
        try:
            await provision(admin, identities.list(), "fuse")
        finally:
            await admin.close()
        yield server


@dataclass
class SecuredBus:
    """A secured nats-server and the identities it lets in."""

    server: NatsServer
    identities: IdentityStore

    async def connect(self, name: str) -> nats.aio.client.Client:
        """A connection as identity `name`, with its credentials."""
        return await connect(
            self.server.url, name=name, credentials=self.identities.credentials(name)
        )

    @asynccontextmanager
    async def key_service(
        self, rate: float | None = None, topics: Topics | None = None, *, name: str = "keys"
    ) -> AsyncIterator[KeyService]:
        """A key service as the service identity `name` (which the bus must let in)."""
        nc = await self.connect(name)
        try:
            keys = await KVKeyStore.open(nc, "fuse")
            async with KeyService(nc, keys, owns_keys=True, rate=rate, topics=topics) as service:
                yield service
        finally:
            await nc.close()

    def admin_env(self) -> dict[str, str]:
        """The environment of `fuse` run by the bus's first admin."""
        admin_name = next(i.name for i in self.identities.list() if i.role == "admin")
        env = {
            **os.environ,
            "FUSE_NATS_URL": self.server.url,
            "FUSE_NATS_CREDENTIALS": str(self.identities.seed_file(admin_name)),
        }
        env.pop("FUSE_STORE", None)
        return env


@asynccontextmanager
async def anonymous_keys(nats_url: str) -> AsyncIterator[tuple[Client, str]]:
    """A connection to a server without identities, a new prefix, and a key service on both
    (it takes the requester a request names)."""
    prefix = new_prefix()
    nc = await connect(nats_url)
    try:
        async with KeyService(nc, await KVKeyStore.open(nc, prefix), prefix=prefix, owns_keys=True):
            yield nc, prefix
    finally:
        await nc.close()


async def raw_nats(url: str, identities: IdentityStore, name: str) -> tuple[Client, list[str]]:
    """A plain nats-py connection as identity `name` (its seed, none of our library), and the
    violations the server reports to it."""
    violations: list[str] = []

    async def on_error(error: Exception) -> None:
        violations.append(str(error))

    nc = await nats.connect(
        url,
        nkeys_seed_str=identities.seed(name),
        inbox_prefix=f"_INBOX_{name}",
        error_cb=on_error,
        allow_reconnect=False,
    )
    return nc, violations


async def refused(violations: list[str], subject: str) -> None:
    """Wait until the server has reported refusing `subject`."""
    async with asyncio.timeout(10):
        while not any(subject.lower() in v for v in violations):
            await asyncio.sleep(0.02)


async def recorded_denials(bus: SecuredBus, stream: str, count: int) -> list[PermissionDenied]:
    """The permission.denied events on `stream` (read as the first admin) once they count
    `count` refusals."""
    admin_name = next(i.name for i in bus.identities.list() if i.role == "admin")
    store = await open_event_store(
        bus.server.url, prefix="fuse", credentials=bus.identities.credentials(admin_name)
    )
    async with store:

        async def recorded() -> list[PermissionDenied]:
            return [
                event.data
                async for event in store.read(stream)
                if isinstance(event.data, PermissionDenied)
            ]

        async def counted() -> bool:
            return sum(e.count for e in await recorded()) == count

        await wait_for(counted)
        return await recorded()


ECHO_AGENT = """
from newfuse.agents import Agent, Context

echo = Agent("echo")


@echo.handler("ping")
async def ping(ctx: Context, body: dict) -> dict:
    return {"pong": body}
"""
"""An agent module a user writes: echo/KEY answers `ping` with what it was sent."""


def start_echo_agent(folder: Path, env: dict[str, str], credentials: Path) -> subprocess.Popen[str]:
    """`fuse agents run` of ECHO_AGENT (written to `folder`) as echo/1, with `credentials`;
    the caller terminates it (and `communicate`s, for its output)."""
    (folder / "echo_mod.py").write_text(ECHO_AGENT)
    agent_env = {**env, "PYTHONPATH": str(folder), "FUSE_NATS_CREDENTIALS": str(credentials)}
    return subprocess.Popen(
        [sys.executable, "-m", "newfuse", "agents", "run", "echo_mod:echo", "--key", "1"],
        env=agent_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
