"""Sealed payload fields and crypto-shredding on real servers, on both backends and both key
stores: plaintext never on the wire or on disk, `forget` turns the fields into their
replacements everywhere (replay, live feeds, `fuse events show`, read models rebuilt), and a
moved, tampered or malformed sealed value is reported and skipped, never a crash."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import stat
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import nats
import pytest
import redis.asyncio as aioredis

from newfuse.errors import (
    KeyStoreError,
    SchemaRegistrationError,
    SealedValueError,
    SealingUnavailableError,
)
from newfuse.eventstore import EventStore, InvalidEventReport, open_event_store
from newfuse.projections import rebuild
from newfuse.projections.agent_state import AgentStateView
from newfuse.projections.builtin import BuiltinProjections
from newfuse.schemas import (
    KEY_FORGOTTEN,
    KEYS_STREAM,
    REDACTED,
    DataSubject,
    KeyForgotten,
    NewEvent,
    Personal,
    RecordedEvent,
    SchemaRegistry,
    Secret,
    Timestamp,
    build_export,
    default_registry,
    utcnow,
)
from newfuse.security import (
    KeyStore,
    KVKeyStore,
    SQLiteKeyStore,
    SubjectCipher,
    forget,
    use_keys,
)
from support import new_prefix, run_fuse, wait_for

EMAIL = "alice@example.com"
PHONE = "+44 20 7946 0958"
TOKEN = "tok-7f3c9a1be2d4"


class SignedUp(msgspec.Struct, frozen=True, kw_only=True):
    customer: Annotated[str, DataSubject()]
    email: Annotated[str, Personal()]
    phone: Annotated[str | None, Personal()] = None
    plan: str


class Connected(msgspec.Struct, frozen=True, kw_only=True):
    """No DataSubject field: the secret is sealed with the stream's key."""

    service: str
    token: Annotated[str, Secret(replacement="(forgotten)")]


class PrivateState(msgspec.Struct, frozen=True, kw_only=True):
    """agent.state_update v2: the state is personal, its subject the agent."""

    agent_id: Annotated[str, DataSubject()] = msgspec.field(name="agentId")
    state: Annotated[dict[str, Any], Personal(replacement={})] = {}
    version: int
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


def registry() -> SchemaRegistry:
    registry = default_registry()
    registry.add("customer.signed_up", 1, SignedUp)
    registry.add("service.connected", 1, Connected)
    registry.add("agent.state_update", 2, PrivateState)
    registry.upcaster("agent.state_update", 1)(lambda v1: v1)
    return registry


def signup(customer: str = "c-42", email: str = EMAIL) -> NewEvent:
    return NewEvent(data=SignedUp(customer=customer, email=email, phone=PHONE, plan="pro"))


Opener = Callable[..., Awaitable[EventStore]]


@pytest.fixture(params=["jetstream+kv", "sqlite+file"])
async def open_store(
    request: pytest.FixtureRequest, nats_url: str, prefix: str, tmp_path: Path
) -> AsyncIterator[Opener]:
    """Opens stores of one backend that share one key store backend (each its own client)."""
    opened: list[EventStore] = []

    async def factory(**options: Any) -> EventStore:
        store: EventStore
        keys: KeyStore
        if request.param == "jetstream+kv":
            store = await open_event_store(nats_url, prefix=prefix, registry=registry(), **options)
            keys = await KVKeyStore.open(store.nc, prefix)  # type: ignore[attr-defined]
        else:
            store = await open_event_store(
                f"sqlite://{tmp_path / 'events.db'}", registry=registry(), **options
            )
            keys = await SQLiteKeyStore.open(tmp_path / "keys.sqlite")
        use_keys(store, keys, owns_keys=True)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


async def stored_bodies(store: EventStore, nats_url: str, tmp_path: Path) -> bytes:
    """Every byte the backend holds for its events, read without newfuse's decoding."""
    if hasattr(store, "nc"):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            name: str = store.stream_name  # type: ignore[attr-defined]
            info = await js.stream_info(name)
            raw = [
                (await js.get_msg(name, seq)).data or b""
                for seq in range(info.state.first_seq, info.state.last_seq + 1)
            ]
        finally:
            await nc.close()
        return b"\n".join(raw)
    db = tmp_path / "events.db"
    return b"".join(path.read_bytes() for path in tmp_path.glob(f"{db.name}*"))


async def read_all(store: EventStore) -> list[RecordedEvent]:
    return [event async for event in store.read_all()]


async def test_sealed_fields_read_back_in_the_clear_and_never_leave_the_writer_so(
    open_store: Opener, nats_url: str, tmp_path: Path
) -> None:
    store = await open_store()
    await store.append("customer.c-42", signup())
    await store.append("service.crm", NewEvent(data=Connected(service="crm", token=TOKEN)))
    first, second = await read_all(store)
    assert first.data == SignedUp(customer="c-42", email=EMAIL, phone=PHONE, plan="pro")
    assert second.data == Connected(service="crm", token=TOKEN)
    assert first.redacted == () and second.redacted == ()
    assert json.loads(bytes(first.envelope.data))["email"] == EMAIL  # what readers see

    stored = await stored_bodies(store, nats_url, tmp_path)
    for plaintext in (EMAIL, PHONE, TOKEN):
        assert plaintext.encode() not in stored
    assert b'"plan":"pro"' in stored and b'"customer":"c-42"' in stored  # the rest is clear
    wire = json.loads(stored.split(b"\n")[0]) if hasattr(store, "nc") else None
    if wire is not None:
        sealed = wire["data"]["email"]
        assert set(sealed) == {"enc", "sub", "kid", "iv", "ct"}
        assert sealed["enc"] == "A256GCM" and sealed["sub"] == "c-42"


async def test_forgetting_a_subject_redacts_its_fields_in_every_read_and_is_audited(
    open_store: Opener,
) -> None:
    store = await open_store()
    await store.append("customer.c-42", signup())
    await store.append("customer.c-7", signup("c-7", "bob@example.com"))
    live: list[RecordedEvent] = []

    async def follow() -> None:
        async with store.subscribe() as feed:
            async for event in feed:
                live.append(event)

    done = await forget(store, "c-42", by="ops@test", reason="erasure request 1187")
    assert done.event.kid is not None
    await store.append("customer.c-42", signup(), 1)  # a new key for a subject seen again
    follower = asyncio.create_task(follow())
    try:
        [old, new] = [event async for event in store.read("customer.c-42")]
        assert old.data == SignedUp(customer="c-42", email=REDACTED, phone=None, plan="pro")
        assert old.redacted == ("$.email", "$.phone")
        assert new.data.email == EMAIL and new.redacted == ()
        [other] = [event async for event in store.read("customer.c-7")]
        assert other.data.email == "bob@example.com"
        await wait_for(lambda: _true(len(live) == 4))
        assert live[0].redacted == ("$.email", "$.phone")  # a live feed redacts too
        assert live[2].type == KEY_FORGOTTEN and live[3].data.email == EMAIL
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)

    [audit] = [event async for event in store.read(KEYS_STREAM)]
    assert audit.type == KEY_FORGOTTEN and isinstance(audit.data, KeyForgotten)
    assert (audit.data.subject, audit.data.by, audit.data.reason) == (
        "c-42",
        "ops@test",
        "erasure request 1187",
    )
    assert audit.data.kid == done.event.kid and audit.metadata["sender"] == "ops@test"
    nothing = await forget(store, "never-sealed", by="ops@test")  # recorded all the same
    assert nothing.event.kid is None


async def test_a_secret_without_a_subject_field_is_sealed_with_its_streams_key(
    open_store: Opener,
) -> None:
    store = await open_store()
    await store.append("service.crm", NewEvent(data=Connected(service="crm", token=TOKEN)))
    await forget(store, "service.crm", by="ops@test")
    [event] = [e async for e in store.read("service.crm")]
    assert event.data == Connected(service="crm", token="(forgotten)")
    assert event.redacted == ("$.token",)


async def test_another_process_that_forgets_is_seen_by_a_reader_that_cached_the_key(
    nats_url: str, prefix: str
) -> None:
    stores = []
    for _ in range(2):  # two processes' worth: own connections, own caches
        store = await open_event_store(nats_url, prefix=prefix, registry=registry())
        use_keys(store, await KVKeyStore.open(store.nc, prefix), owns_keys=True)  # type: ignore[attr-defined]
        stores.append(store)
    writer, reader = stores
    try:
        await writer.append("customer.c-42", signup())
        [seen] = await read_all(reader)
        assert seen.data.email == EMAIL  # the reader cached the key
        await forget(writer, "c-42", by="ops@test")

        async def redacted_for_reader() -> bool:
            return (await read_all(reader))[0].redacted == ("$.email", "$.phone")

        await wait_for(redacted_for_reader)
    finally:
        for store in stores:
            await store.close()


async def test_a_store_without_keys_refuses_to_write_sealed_fields_and_reads_them_redacted(
    open_store: Opener, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    store = await open_store()
    await store.append("customer.c-42", signup())
    if hasattr(store, "nc"):
        bare = await open_event_store(nats_url, prefix=prefix, registry=registry())
    else:
        bare = await open_event_store(f"sqlite://{tmp_path / 'events.db'}", registry=registry())
    async with bare:
        with pytest.raises(SealingUnavailableError, match=r"declares sealed field\(s\) \$\.email"):
            await bare.append("customer.c-9", signup("c-9"))
        [event] = await read_all(bare)
        assert event.data.email == REDACTED and event.data.plan == "pro"


async def test_a_moved_or_tampered_sealed_value_is_reported_and_the_reader_goes_on(
    open_store: Opener, nats_url: str, tmp_path: Path
) -> None:
    store = await open_store()
    reports: list[InvalidEventReport] = []
    store.on_invalid = reports.append
    await store.append("customer.c-42", [signup(), signup()])
    bodies = [json.loads(line) for line in (await raw_events(store, nats_url, tmp_path))]
    first, second = bodies
    moved = dict(second, data={**second["data"], "email": first["data"]["email"]})
    ct = first["data"]["phone"]["ct"]
    tampered = dict(first, data={**first["data"], "phone": {**first["data"]["phone"]}})
    tampered["data"]["phone"]["ct"] = ("A" if ct[0] != "A" else "B") + ct[1:]
    await rewrite(store, nats_url, tmp_path, {1: tampered, 2: moved})
    await store.append("customer.c-42", signup(), 2)  # after them: still read

    events = await read_all(store)
    assert [event.version for event in events] == [3]
    assert [r.error for r in reports] == [
        f"sealed field $.phone of event '{first['id']}': it does not authenticate: moved from "
        f"another event or field, or altered",
        f"sealed field $.email of event '{second['id']}': it does not authenticate: moved from "
        f"another event or field, or altered",
    ]


async def test_a_foreign_clients_malformed_sealed_value_is_reported_and_skipped(
    nats_url: str, prefix: str
) -> None:
    store = await open_event_store(nats_url, prefix=prefix, registry=registry())
    use_keys(store, await KVKeyStore.open(store.nc, prefix), owns_keys=True)  # type: ignore[attr-defined]
    reports: list[InvalidEventReport] = []
    store.on_invalid = reports.append
    async with store:
        nc = await nats.connect(nats_url)
        try:
            for version, email in enumerate(
                ['{"enc":"A256GCM","sub":"c-1"}', '"alice@example.com"'], 1
            ):
                body = (
                    f'{{"id":"0192f0c1-7a1b-7c3d-8e4f-01234567890{version}",'
                    f'"stream":"customer.c-1","type":"customer.signed_up","version":{version},'
                    f'"timestamp":"2026-11-24T12:00:00Z","data":{{"customer":"c-1",'
                    f'"email":{email},"plan":"free"}}}}'
                )
                await nc.jetstream().publish(f"{prefix}.ev.customer.c-1", body.encode())
        finally:
            await nc.close()
        await store.append("customer.c-1", signup("c-1"))
        events = await read_all(store)
    assert [(e.version, e.data.email) for e in events] == [(3, EMAIL)]
    assert len(reports) == 2
    assert "`$.email` is declared personal: its value must be a sealed value" in reports[0].error
    assert "Object missing required field `kid`" in reports[0].error
    assert "not b'\"alice@example.com\"'" in reports[1].error


async def test_the_audit_index_and_agent_state_rebuilt_after_forget_hold_no_plaintext(
    nats_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    store = await open_event_store(nats_url, prefix=prefix, registry=registry())
    use_keys(store, await KVKeyStore.open(store.nc, prefix), owns_keys=True)  # type: ignore[attr-defined]
    audit_db = tmp_path / "read-models.db"
    secret_state = {"email": EMAIL, "step": "plan"}
    async with (
        store,
        await BuiltinProjections.open(
            redis_url=redis_url, audit_db=str(audit_db), prefix=prefix
        ) as builtin,
    ):
        await store.append("customer.c-42", signup())
        await store.append(
            "agent.c-42",
            NewEvent(data=PrivateState(agent_id="c-42", state=secret_state, version=1)),
        )
        for name in ("audit", "agent_state"):
            await rebuild_one(builtin, name, store)
        assert EMAIL.encode() in _files(audit_db)  # the index holds what readers see
        view = AgentStateView(builtin.redis)
        state = await view.get("c-42")
        assert state is not None and state.state == secret_state

        await forget(store, "c-42", by="ops@test")
        for name in ("audit", "agent_state"):
            await rebuild_one(builtin, name, store)

        on_disk = _files(audit_db)
        for plaintext in (EMAIL, PHONE):
            assert plaintext.encode() not in on_disk
        rows = (
            sqlite3.connect(audit_db)
            .execute("SELECT type, payload FROM audit_events ORDER BY position")
            .fetchall()
        )
        assert [row[0] for row in rows] == [
            "customer.signed_up",
            "agent.state_update",
            KEY_FORGOTTEN,
        ]
        assert json.loads(rows[0][1])["email"] == REDACTED
        state = await view.get("c-42")
        assert state is not None and state.state == {} and state.version == 1
        assert not await _redis_holds(redis_url, prefix, EMAIL)


async def rebuild_one(builtin: BuiltinProjections, name: str, store: EventStore) -> None:
    projection, model = builtin.get(name)
    await rebuild(projection, store, model)


def _files(db: Path) -> bytes:
    return b"".join(path.read_bytes() for path in db.parent.glob(f"{db.name}*"))


async def _redis_holds(redis_url: str, prefix: str, text: str) -> bool:
    client = aioredis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*"):
            kind = (await client.type(key)).decode()
            values: list[Any] = []
            if kind == "hash":
                values = list((await client.hgetall(key)).values())
            elif kind == "string":
                values = [await client.get(key)]
            if any(text.encode() in value for value in values if isinstance(value, bytes)):
                return True
        return False
    finally:
        await client.aclose()


async def raw_events(store: EventStore, nats_url: str, tmp_path: Path) -> list[bytes]:
    if hasattr(store, "nc"):
        return (await stored_bodies(store, nats_url, tmp_path)).split(b"\n")
    with sqlite3.connect(tmp_path / "events.db") as db:
        return [bytes(row[0]) for row in db.execute("SELECT body FROM events ORDER BY position")]


async def rewrite(
    store: EventStore, nats_url: str, tmp_path: Path, bodies: dict[int, dict[str, Any]]
) -> None:
    """Replace stored events (by version in their stream) with `bodies`, below newfuse: a
    foreign writer on JetStream (the originals deleted), a hand edit of the SQLite file."""
    if hasattr(store, "nc"):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            name: str = store.stream_name  # type: ignore[attr-defined]
            info = await js.stream_info(name)
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                await js.delete_msg(name, seq)
            for _, body in sorted(bodies.items()):
                subject = f"{store.subjects.prefix}.ev.{body['stream']}"  # type: ignore[attr-defined]
                await js.publish(subject, json.dumps(body).encode())
        finally:
            await nc.close()
        return
    with sqlite3.connect(tmp_path / "events.db") as db:
        for version, body in bodies.items():
            db.execute(
                "UPDATE events SET body = ? WHERE version = ?",
                (json.dumps(body, separators=(",", ":")), version),
            )


async def _true(condition: bool) -> bool:
    return condition


async def test_fuse_events_show_opens_sealed_fields_and_fuse_forget_redacts_them(
    nats_url: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    store = await open_event_store(nats_url, prefix=prefix, registry=registry())
    use_keys(store, await KVKeyStore.open(store.nc, prefix), owns_keys=True)  # type: ignore[attr-defined]
    async with store:
        result = await store.append("customer.c-42", signup())
    env = {
        **os.environ,
        "FUSE_NATS_URL": nats_url,
        "FUSE_PREFIX": prefix,
        "FUSE_STATE_DIR": str(tmp_path / "state"),
    }
    env.pop("FUSE_STORE", None)
    show = ["events", "show", "--position", str(result.position), "--json"]
    # The CLI has no SignedUp struct: it recognises sealed values by their wire form.
    shown = json.loads(run_fuse(*show, env=env).stdout)
    assert shown["data"]["email"] == EMAIL and "redacted" not in shown

    forgotten = json.loads(
        run_fuse(
            "forget", "c-42", "--reason", "ticket 9", "--by", "ops@test", "--json", env=env
        ).stdout
    )
    assert forgotten["subject"] == "c-42" and forgotten["kid"] and forgotten["by"] == "ops@test"
    shown = json.loads(run_fuse(*show, env=env).stdout)
    assert shown["data"] == {"customer": "c-42", "email": None, "phone": None, "plan": "pro"}
    assert shown["redacted"] == ["$.email", "$.phone"]
    table = run_fuse("forget", "c-42", env=env).stdout
    assert "c-42" in table and "KEY DELETED" in table
    audit = run_fuse("replay", "--stream", KEYS_STREAM, "--json", env=env).stdout
    assert [json.loads(line)["data"]["reason"] for line in audit.splitlines()] == [
        "ticket 9",
        None,
    ]


async def test_the_local_key_file_is_owner_only_and_refused_when_others_can_read_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys" / "keys.sqlite"
    keys = await SQLiteKeyStore.open(path)
    key = await keys.create("c-42")
    assert (await keys.create("c-42")).kid == key.kid  # one key per subject
    assert "key=<hidden>" in repr(key) and key.key.hex() not in repr(key)
    await keys.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)
    with pytest.raises(KeyStoreError, match=r"readable by others \(mode 644\); chmod 600 it"):
        await SQLiteKeyStore.open(path)


def test_the_exported_schema_shows_sealed_fields_in_their_wire_form() -> None:
    files = build_export(registry())
    schema = files["customer.signed_up.v1.json"]
    email = schema["$defs"]["SignedUp"]["properties"]["email"]
    assert email["$ref"] == "#/$defs/SealedValue"
    assert email["x-newfuse-sealed"] == {
        "kind": "personal",
        "subject": "customer",
        "plaintext": {"type": "string"},
    }
    sealed = schema["$defs"]["SealedValue"]
    assert sorted(sealed["required"]) == ["ct", "enc", "iv", "kid", "sub"]
    plan = schema["$defs"]["SignedUp"]["properties"]["plan"]
    assert plan == {"type": "string"}
    token = files["service.connected.v1.json"]["$defs"]["Connected"]["properties"]["token"]
    assert token["x-newfuse-sealed"]["subject"] is None  # the event's stream


def test_unusable_declarations_are_refused_at_registration() -> None:
    class NoSubject(msgspec.Struct, frozen=True, kw_only=True):
        email: Annotated[str, Personal(subject="customer")]

    class BadReplacement(msgspec.Struct, frozen=True, kw_only=True):
        count: Annotated[int, Personal()]

    with pytest.raises(SchemaRegistrationError, match="its subject 'customer' is not a str field"):
        SchemaRegistry().add("x.no_subject", 1, NoSubject)
    with pytest.raises(SchemaRegistrationError, match=r"give Personal\(replacement=\.\.\.\)"):
        SchemaRegistry().add("x.bad", 1, BadReplacement)


EVENT_ID = "0192f0c1-7a1b-7c3d-8e4f-0123456789ab"


async def sealed_signup(tmp_path: Path, phone: str | None = PHONE) -> tuple[bytes, SubjectCipher]:
    """A `customer.signed_up` payload as a store would keep it (fields sealed), and its cipher."""
    plan = registry().sealed("customer.signed_up", 1)
    assert plan is not None
    cipher = SubjectCipher(await SQLiteKeyStore.open(tmp_path / "keys.sqlite"), owns_keys=True)
    await cipher.load(["c-42"], create=True)
    clear = msgspec.json.encode(SignedUp(customer="c-42", email=EMAIL, phone=phone, plan="pro"))
    return plan.seal(clear, EVENT_ID, "customer.c-42", cipher), cipher


def open_signup(data: bytes, cipher: SubjectCipher) -> Any:
    plan = registry().sealed("customer.signed_up", 1)
    assert plan is not None
    opened = plan.open(data, EVENT_ID, "customer.c-42", cipher)
    return msgspec.json.decode(opened.data, type=SignedUp), opened.redacted


@pytest.mark.parametrize(
    ("iv", "ct", "reason"),
    [
        ("AAAAAAAAAAAAAA==", None, "its iv is 10 bytes long, AES-GCM here uses 12"),
        ("A" * 24, None, "its iv is 18 bytes long, AES-GCM here uses 12"),
        ("AAAAAAAAAAAAAAA!", None, "its iv or ct is not base64url"),
        (None, "not base64!", "its iv or ct is not base64url"),
        (None, "é" * 8, "its iv or ct is not base64url"),
        (None, "A", "its iv or ct is not base64url"),
    ],
)
async def test_a_sealed_value_whose_iv_or_ct_does_not_decode_says_which(
    tmp_path: Path, iv: str | None, ct: str | None, reason: str
) -> None:
    data, cipher = await sealed_signup(tmp_path)
    doc = json.loads(data)
    doc["email"] |= {k: v for k, v in (("iv", iv), ("ct", ct)) if v is not None}
    with pytest.raises(SealedValueError) as raised:
        open_signup(json.dumps(doc).encode(), cipher)
    assert str(raised.value) == f"sealed field $.email of event '{EVENT_ID}': {reason}"
    await cipher.close()


async def test_padded_or_null_sealed_values_open_and_a_copied_one_is_refused(
    tmp_path: Path,
) -> None:
    data, cipher = await sealed_signup(tmp_path, phone=None)
    assert json.loads(data)["phone"] is None  # null is not sealed, and opens as null
    assert open_signup(data, cipher) == (
        SignedUp(customer="c-42", email=EMAIL, phone=None, plan="pro"),
        (),
    )
    doc = json.loads(data)
    doc["email"]["ct"] += "=" * (-len(doc["email"]["ct"]) % 4)  # padding is allowed
    assert open_signup(json.dumps(doc).encode(), cipher)[0].email == EMAIL
    del doc["phone"]  # absent: the default
    assert open_signup(json.dumps(doc).encode(), cipher)[0].phone is None

    doc["plan"] = {"copy": doc["email"]}  # the same sealed value twice: which one is the field's?
    copied = json.dumps(doc, separators=(",", ":")).encode()
    with pytest.raises(ValueError, match=r"the sealed value of `\$\.email` appears more than once"):
        open_signup(copied, cipher)
    await cipher.close()


async def test_a_sealed_values_iv_and_ct_are_unpadded_base64url_of_nonce_and_ciphertext(
    tmp_path: Path,
) -> None:
    data, cipher = await sealed_signup(tmp_path)
    for field in ("email", "phone"):
        value = json.loads(data)[field]
        assert len(base64.urlsafe_b64decode(value["iv"])) == 12
        plaintext = json.dumps(EMAIL if field == "email" else PHONE, separators=(",", ":"))
        ct = base64.urlsafe_b64decode(value["ct"] + "=" * (-len(value["ct"]) % 4))
        assert len(ct) == len(plaintext.encode()) + 16  # the GCM tag after the ciphertext
        assert "=" not in value["iv"] + value["ct"]
        assert set(value["iv"] + value["ct"]) <= set(string.ascii_letters + string.digits + "-_")
    await cipher.close()
