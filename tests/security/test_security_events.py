"""Security events in the log: identities made and revoked (`fuse auth`), refusals the bus's
own connections saw (`permission.denied`, bounded), and `fuse audit security` listing them."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats import NatsServer
from newfuse.schemas import (
    DENIALS_STREAM,
    IDENTITIES_STREAM,
    IdentityCreated,
    IdentityRevoked,
    PermissionDenied,
)
from newfuse.security._tally import MAX_TEXT
from newfuse.security.events import MAX_TRACKED, OTHERS, DenialRecorder, sync_identities
from newfuse.security.identities import IdentityStore
from support import run_fuse, secured_nats


@dataclass
class Secured:
    server: NatsServer
    identities: IdentityStore
    folder: Path

    async def store(self, name: str) -> EventStore:
        credentials = self.identities.credentials(name)
        return await open_event_store(self.server.url, prefix="fuse", credentials=credentials)


@pytest.fixture(scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    folder = tmp_path_factory.mktemp("secured")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("runner", "service")
    identities.add("echo-1", "agent", agent="echo/1")
    identities.add("ada", "reviewer", groups=["ops", "finance"])
    async with secured_nats(folder, identities) as server:
        yield Secured(server, identities, folder)


async def _payloads(store: EventStore, stream: str) -> list[object]:
    return [event.data async for event in store.read(stream)]


async def test_identities_are_recorded_once_and_a_revocation_after_them(secured: Secured) -> None:
    store = await secured.store("admin")
    async with store:
        first = await sync_identities(store, secured.identities.list(), by="ops")
        again = await sync_identities(store, secured.identities.list(), by="ops")
        secured.identities.revoke("echo-1")
        revoked = await sync_identities(store, secured.identities.list(), by="ops")
        events = await _payloads(store, IDENTITIES_STREAM)
    assert (first, again, revoked) == (4, 0, 1)
    created = [e for e in events if isinstance(e, IdentityCreated)]
    assert {(e.name, e.role, e.by) for e in created} == {
        ("admin", "admin", "ops"),
        ("runner", "service", "ops"),
        ("echo-1", "agent", "ops"),
        ("ada", "reviewer", "ops"),
    }
    assert next(e for e in created if e.name == "echo-1").agent == "echo/1"
    assert next(e for e in created if e.name == "ada").groups == ["ops", "finance"]
    assert [(e.name, e.by) for e in events if isinstance(e, IdentityRevoked)] == [("echo-1", "ops")]
    seed = secured.identities.seed("runner")
    assert all(seed not in json.dumps(str(e)) for e in events)  # a seed never reaches the log


async def test_refusals_a_service_sees_are_recorded_bounded_per_identity_and_subject(
    secured: Secured,
) -> None:
    store = await secured.store("runner")
    async with store:
        recorder = DenialRecorder(store, seen_by="runner-process").start()
        nc = store.nc  # type: ignore[attr-defined]
        for _ in range(5):  # a loop of the same refusal: one event now, the rest counted
            await nc.publish("$JS.API.STREAM.DELETE.FUSE_EVENTS", b"")
        await nc.flush()
        async with asyncio.timeout(10):
            while recorder.written < 1:
                await asyncio.sleep(0.02)
        # the server reports each refusal once: wait until all five were counted
        async with asyncio.timeout(10):
            while recorder.pending < 4:
                await asyncio.sleep(0.02)
        await recorder.close()
        events = [e for e in await _payloads(store, DENIALS_STREAM)]
    denied = [e for e in events if isinstance(e, PermissionDenied)]
    assert [e.count for e in denied] == [1, 4]
    assert {(e.identity, e.operation, e.subject, e.seen_by) for e in denied} == {
        ("runner", "publish to", "$js.api.stream.delete.fuse_events", "runner-process")
    }


def test_fuse_auth_sync_and_fuse_audit_security_list_what_happened(secured: Secured) -> None:
    env = {
        **os.environ,
        "FUSE_STATE_DIR": str(secured.folder / "state"),
        "FUSE_NATS_URL": secured.server.url,
        "FUSE_NATS_CREDENTIALS": str(secured.identities.directory / "admin.creds"),
    }
    auth = ["auth", "--dir", str(secured.identities.directory)]
    added = run_fuse(*auth, "add", "writer-1", "--role", "agent", "--agent", "writer/1", env=env)
    assert "not in the log yet: `fuse auth sync` records it" in added.stderr
    synced = run_fuse(*auth, "sync", "--as", "ada", "--json", env=env)
    assert json.loads(synced.stdout)["appended"] >= 1
    rows = [
        json.loads(line)
        for line in run_fuse("audit", "security", "--json", env=env).stdout.splitlines()
    ]
    writer = [
        r for r in rows if r["type"] == "identity.created" and r["data"]["name"] == "writer-1"
    ]
    assert len(writer) == 1 and writer[0]["data"]["by"] == "ada"
    assert writer[0]["stream"] == IDENTITIES_STREAM
    table = run_fuse("audit", "security", env=env).stdout
    assert "identity.created" in table and "writer-1" in table and "agent writer/1" in table


async def test_a_flood_claiming_ever_new_identities_still_makes_a_bounded_number_of_events(
    tmp_path: Path,
) -> None:
    flood = 1000
    async with await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store:
        recorder = DenialRecorder(store, seen_by="coder/1", stream="agent.coder-1")
        for n in range(flood):  # each refusal in the name of an identity never seen before
            recorder.record(
                identity=f"claimed-{n}",
                operation="send",
                subject="fuse.a2a.coder",
                message_type="x",
            )
        await recorder.close()
        events = [e for e in await _payloads(store, "agent.coder-1")]
    denied = [e for e in events if isinstance(e, PermissionDenied)]
    # each tracked identity once; the rest together: at its first refusal, and at close
    assert len(denied) == MAX_TRACKED + 2
    assert sum(e.count for e in denied) == flood  # every refusal is counted in one of them
    others = [e for e in denied if e.identity == OTHERS]
    assert sorted((e.subject, e.count) for e in others) == [
        (OTHERS, 1),
        (OTHERS, flood - MAX_TRACKED - 1),
    ]


async def test_a_count_still_pending_goes_out_when_its_window_is_over_without_a_close(
    tmp_path: Path,
) -> None:
    async with await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store:
        recorder = DenialRecorder(store, seen_by="coder/1", stream="agent.coder-1", window=0.4)
        for _ in range(5):
            recorder.record(identity="rogue-1", operation="send", subject="fuse.a2a.coder")
        async with asyncio.timeout(10):  # the first at once, the other four when the window ends
            while recorder.written < 2:
                await asyncio.sleep(0.02)
        assert recorder.pending == 0
        events = [e for e in await _payloads(store, "agent.coder-1")]
        await recorder.close()
    assert [e.count for e in events if isinstance(e, PermissionDenied)] == [1, 4]


async def test_a_claimed_identity_of_any_length_is_recorded_clamped(tmp_path: Path) -> None:
    async with await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store:
        recorder = DenialRecorder(store, seen_by="coder/1", stream="agent.coder-1")
        # what a client without identities may claim as its sender: any text it likes
        recorder.record(identity="x" * 100_000 + "\x1b[2J", operation="send", subject="s")
        await recorder.close()
        [denied] = [e for e in await _payloads(store, "agent.coder-1")]
    assert isinstance(denied, PermissionDenied)
    assert len(denied.identity) == MAX_TEXT and denied.identity.endswith("…")
