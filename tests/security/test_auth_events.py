"""Logins a secured nats-server refuses become `auth.failed` events (security/auth_events.py).

A server runs with `server_config` for an admin, an agent, a revoked-to-be agent and a `system`
identity; the recorder listens as the system identity. Strangers knock with an unknown nkey, a
revoked identity's seed, a known nkey with another key's signature (spoken in the raw NATS
protocol, since no client library sends a wrong signature), in bursts and under many names;
and the system user itself publishes advisories that are not."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nkeys  # type: ignore[import-untyped]
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from newfuse.cli.auth import write_dev_config
from newfuse.errors import PermissionDeniedError
from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats import NatsServer, Subjects, connect
from newfuse.nats.connection import Credentials
from newfuse.schemas import AUTH_FAILURES_STREAM, AuthFailed, NewEvent
from newfuse.security.auth_events import (
    ADVISORIES,
    MAX_ADVISORY,
    MAX_TEXT,
    OTHERS,
    AuthFailureRecorder,
)
from newfuse.security.identities import IdentityStore, new_seed, public_key_of, server_config
from support import run_fuse, secured_nats, wait_for

REFUSED = "Authentication Failure"


@dataclass
class Secured:
    server: NatsServer
    identities: IdentityStore
    config: Path

    async def store(self) -> EventStore:
        credentials = self.identities.credentials("admin")
        return await open_event_store(self.server.url, prefix="fuse", credentials=credentials)

    async def system(self) -> Client:
        return await connect(self.server.url, credentials=self.identities.credentials("watcher"))

    async def reload(self) -> None:
        """Rewrite the configuration as `fuse auth` does, have the server reload it, and wait
        until it says it did (a login under way while it reloads is refused without a name)."""
        write_dev_config(self.config, self.identities, "fuse", self.server.server_name)
        log = self.server.log_path
        done = "Reloaded server configuration"
        before = log.read_text().count(done)
        assert self.server.pid is not None
        os.kill(self.server.pid, signal.SIGHUP)

        async def reloaded() -> bool:
            return log.read_text().count(done) > before

        await wait_for(reloaded)


@pytest.fixture(scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    folder = tmp_path_factory.mktemp("auth-failures")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("caller", "agent", agent="caller/1")
    identities.add("gone", "agent", agent="gone/1")
    identities.add("watcher", "system")
    async with secured_nats(folder, identities) as server:
        yield Secured(server, identities, folder / "auth.conf")


@dataclass
class Watching:
    recorder: AuthFailureRecorder
    store: EventStore

    async def events(self, presented: str) -> list[AuthFailed]:
        return [
            event.data
            async for event in self.store.read(AUTH_FAILURES_STREAM)
            if isinstance(event.data, AuthFailed) and event.data.presented == presented
        ]

    async def written(self, count: int) -> None:
        async def enough() -> bool:
            return self.recorder.written >= count

        await wait_for(enough)


@pytest.fixture
async def watching(secured: Secured) -> AsyncIterator[Watching]:
    """A recorder as the system identity, writing with the admin's store."""
    store, system = await secured.store(), await secured.system()
    try:
        async with (
            store,
            AuthFailureRecorder(
                store, system, seen_by="auth-test", identify=secured.identities.name_of
            ) as recorder,
        ):
            yield Watching(recorder, store)
    finally:
        await system.close()


async def knock(url: str, *, nkey: str, signer: str, name: str = "knocker") -> str:
    """Log in in the raw NATS protocol as `nkey`, signing the server's nonce with the seed
    `signer`; returns the server's first answer."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        info = json.loads((await reader.readline()).decode().removeprefix("INFO "))
        pair = nkeys.from_seed(bytearray(signer.encode()))
        signature = base64.urlsafe_b64encode(pair.sign(info["nonce"].encode())).rstrip(b"=")
        connect_line = {"verbose": False, "nkey": nkey, "sig": signature.decode(), "name": name}
        writer.write(f"CONNECT {json.dumps(connect_line)}\r\nPING\r\n".encode())
        await writer.drain()
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def stranger_knocks(url: str) -> str:
    """Log in with a new nkey the server does not know; returns the key it presented."""
    seed = new_seed().decode()
    key = public_key_of(seed.encode())
    assert "authorization violation" in (await knock(url, nkey=key, signer=seed)).lower()
    return key


async def test_an_unknown_nkey_is_recorded_with_what_it_presented_and_from_where(
    secured: Secured, watching: Watching
) -> None:
    stranger = Credentials(identity="stranger", seed=new_seed().decode(), inbox_prefix="_I")
    with pytest.raises(PermissionDeniedError, match="'stranger' may not connect"):
        await connect(secured.server.url, name="stranger-client", credentials=stranger)
    await watching.written(1)
    [event, *_] = await watching.events(public_key_of(stranger.seed.encode()))
    assert (event.identity, event.address, event.reason) == ("", "127.0.0.1", REFUSED)
    assert event.client_name == "stranger-client" and event.client_library.startswith("python")
    assert event.seen_by == "auth-test" and event.server == secured.server.server_name
    assert event.count >= 1 and event.first_at <= event.last_at


async def test_a_revoked_identity_knocking_is_recorded_under_its_name(
    secured: Secured, watching: Watching
) -> None:
    seed = secured.identities.seed("gone")
    key = secured.identities.get("gone").public_key
    secured.identities.revoke("gone")
    await secured.reload()
    answer = await knock(secured.server.url, nkey=key, signer=seed)
    assert "authorization violation" in answer.lower()
    await watching.written(1)
    [event] = await watching.events(key)
    assert (event.presented, event.identity, event.reason) == (key, "gone", REFUSED)
    # the others are still let in after the reload, the system identity too
    admin = await connect(secured.server.url, credentials=secured.identities.credentials("admin"))
    await admin.close()


async def test_a_known_nkey_signed_by_another_key_is_recorded_naming_that_identity(
    secured: Secured, watching: Watching
) -> None:
    caller = secured.identities.get("caller").public_key
    forger = new_seed().decode()
    answer = await knock(secured.server.url, nkey=caller, signer=forger, name="forger")
    assert "authorization violation" in answer.lower()
    await watching.written(1)
    [event] = await watching.events(caller)
    assert (event.identity, event.client_name, event.reason) == ("caller", "forger", REFUSED)
    # the genuine caller still gets in
    genuine = await knock(secured.server.url, nkey=caller, signer=secured.identities.seed("caller"))
    assert genuine == "PONG"


async def test_a_burst_of_a_hundred_refusals_makes_a_bounded_number_of_events(
    secured: Secured, watching: Watching
) -> None:
    seed = new_seed().decode()
    key, other = public_key_of(seed.encode()), new_seed().decode()
    for _ in range(100):
        assert await knock(secured.server.url, nkey=key, signer=other) != "PONG"

    async def all_heard() -> bool:
        return watching.recorder.heard >= 100

    await wait_for(all_heard)
    await watching.recorder.close()  # writes out what it counted since the first event
    events = await watching.events(key)
    assert sum(e.count for e in events) == 100
    assert len(events) <= 2 and events[0].count == 1  # one at once, the rest counted into one


async def test_many_names_from_one_address_are_counted_together_past_the_tracked_pairs(
    secured: Secured,
) -> None:
    store, system = await secured.store(), await secured.system()
    try:
        async with store:
            async with AuthFailureRecorder(
                store, system, seen_by="spray-test", max_tracked=4
            ) as recorder:
                for _ in range(20):
                    await stranger_knocks(secured.server.url)

                async def all_heard() -> bool:
                    return recorder.heard >= 20

                await wait_for(all_heard)
            events = [
                e.data
                async for e in store.read(AUTH_FAILURES_STREAM)
                if isinstance(e.data, AuthFailed) and e.data.seen_by == "spray-test"
            ]
    finally:
        await system.close()
    # four pairs tracked, one event each; the other sixteen names counted together: one event
    # at once, the rest written out on close
    others = [e for e in events if (e.presented, e.address) == OTHERS]
    assert [e.count for e in events if e not in others] == [1, 1, 1, 1]
    assert len(others) <= 2 and sum(e.count for e in others) == 16


async def test_a_message_on_the_advisory_subject_that_is_not_one_is_skipped(
    secured: Secured, watching: Watching
) -> None:
    system = await secured.system()
    subject = "$SYS.SERVER.FORGED.CLIENT.AUTH.ERR"
    huge = "U" + "\x1b[2J" + "x" * 20_000
    try:
        for body in (
            b"not json",
            b'{"client": 5}',
            b'{"reason": "no client"}',
            b'{"client": {"user": 5}}',
            b" " * (MAX_ADVISORY + 1),
        ):
            await system.publish(subject, body)
        advisory = {"client": {"user": huge, "host": "h" * 5000}, "reason": "r" * 5000}
        await system.publish(subject, json.dumps(advisory).encode())
        await system.flush()
    finally:
        await system.close()

    async def all_seen() -> bool:
        return watching.recorder.skipped >= 5 and watching.recorder.heard >= 1

    await wait_for(all_seen)
    # the listener lives on: a real refusal after them is recorded
    key = await stranger_knocks(secured.server.url)
    await watching.written(2)
    assert len(await watching.events(key)) == 1
    [clamped] = [
        e.data
        async for e in watching.store.read(AUTH_FAILURES_STREAM)
        if isinstance(e.data, AuthFailed) and e.data.presented.startswith("U\\x1b")
    ]
    assert len(clamped.presented) == len(clamped.address) == len(clamped.reason) == MAX_TEXT
    assert "\x1b" not in clamped.presented and clamped.presented.endswith("…")
    assert watching.recorder.skipped == 5


async def test_fuse_audit_security_lists_the_refusals(
    secured: Secured, watching: Watching, tmp_path: Path
) -> None:
    caller = secured.identities.get("caller").public_key
    assert await knock(secured.server.url, nkey=caller, signer=new_seed().decode()) != "PONG"
    await watching.written(1)
    env = {
        **os.environ,
        "FUSE_STATE_DIR": str(tmp_path / "state"),
        "FUSE_NATS_URL": secured.server.url,
        "FUSE_NATS_CREDENTIALS": str(secured.identities.seed_file("admin")),
    }
    rows = [
        json.loads(line)
        for line in run_fuse("audit", "security", "--json", env=env).stdout.splitlines()
    ]
    failed = [r for r in rows if r["type"] == "auth.failed"]
    assert failed and all(r["stream"] == AUTH_FAILURES_STREAM for r in failed)
    assert any(r["data"]["presented"] == caller for r in failed)
    table = run_fuse("audit", "security", "--limit", "1", env=env).stdout  # the newest
    assert f"{caller[:12]}… (caller)" in table and "from 127.0.0.1: Authentication" in table


async def test_the_system_identity_sees_the_servers_account_and_not_the_bus(
    secured: Secured, watching: Watching
) -> None:
    system = await secured.system()
    admin = await connect(secured.server.url, credentials=secured.identities.credentials("admin"))
    try:
        # the bus's streams are in the global account: the system account has no JetStream
        refused = json.loads((await system.request("$JS.API.STREAM.NAMES", b"", timeout=5)).data)
        assert refused["error"]["description"] == "JetStream not enabled for account"
        names = json.loads((await admin.request("$JS.API.STREAM.NAMES", b"", timeout=5)).data)
        assert "error" not in names
        # and the advisories reach only the system account
        heard: list[str] = []

        async def on_advisory(msg: Msg) -> None:
            heard.append(msg.subject)

        await admin.subscribe(ADVISORIES, cb=on_advisory)
        await admin.flush()
        await stranger_knocks(secured.server.url)
        await watching.written(1)  # the system account heard it; the bus's did not
        await admin.flush()
        assert heard == []
        ping = await system.request("$SYS.REQ.SERVER.PING", b"", timeout=5)
        assert json.loads(ping.data)["server"]["name"] == secured.server.server_name
    finally:
        await admin.close()
        await system.close()


async def test_a_store_directory_keeps_its_streams_when_the_system_account_comes(
    tmp_path: Path,
) -> None:
    identities = IdentityStore(tmp_path / "auth")
    admin = identities.add("admin", "admin")
    identities.add("watcher", "system")
    config = tmp_path / "auth.conf"
    # the layout before the system account: the bus's users alone, in the global account
    config.write_text(f'authorization {{\n  users = [ {{"nkey": "{admin.public_key}"}} ]\n}}\n')
    server = NatsServer(data_dir=tmp_path / "nats", extra_args=["--config", str(config)])
    async with server:
        async with await open_event_store(
            server.url, prefix="fuse", credentials=identities.credentials("admin")
        ) as store:
            await store.append("agent.kept", NewEvent(data={"text": "before"}, type="note.kept"))
    config.write_text(server_config(identities.list(), Subjects("fuse")))
    async with server:
        async with await open_event_store(
            server.url, prefix="fuse", credentials=identities.credentials("admin")
        ) as store:
            assert [e.data async for e in store.read("agent.kept")] == [{"text": "before"}]


async def test_refusals_are_recorded_again_after_nats_server_is_killed_and_restarted(
    tmp_path: Path,
) -> None:
    identities = IdentityStore(tmp_path / "auth")
    identities.add("admin", "admin")
    identities.add("watcher", "system")
    async with secured_nats(tmp_path, identities) as server:
        store = await open_event_store(
            server.url, prefix="fuse", credentials=identities.credentials("admin")
        )
        system = await connect(server.url, credentials=identities.credentials("watcher"))
        try:
            async with (
                store,
                AuthFailureRecorder(
                    store, system, seen_by="auth-test", identify=identities.name_of
                ) as recorder,
            ):
                before = await stranger_knocks(server.url)
                await wait_for(lambda: _at_least(recorder, 1))
                await server.kill()
                await server.restart()  # same port, same data, same configuration
                # strangers knock until one is heard: the system connection reconnects on its
                # own (a refusal before it is back is told to no one)
                after: list[str] = []

                async def heard_again() -> bool:
                    after.append(await stranger_knocks(server.url))
                    return recorder.written >= 2

                await wait_for(heard_again, timeout=30.0, interval=0.2)
                presented = {
                    event.data.presented
                    async for event in store.read(AUTH_FAILURES_STREAM)
                    if isinstance(event.data, AuthFailed)
                }
        finally:
            await system.close()
    assert before in presented and presented & set(after)


async def _at_least(recorder: AuthFailureRecorder, count: int) -> bool:
    return recorder.written >= count
