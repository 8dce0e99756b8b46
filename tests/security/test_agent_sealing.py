"""Agents seal and open Personal() fields through the key service, never holding a key, on a
secured nats-server (each process its own identity).

alice/1 sends bob/1 a message whose payload struct declares a personal email: the log holds
ciphertext, bob's handler sees plaintext; eve/1, a third agent, is refused by the service;
after `forget` both alice and bob read the field as redacted; a forged open request (raw
nats-py, another identity's certificate or a copied signed request) is refused; hostile
requests get clear errors and the service goes on; with the service gone, a sender gets
KeyServiceUnavailableError at once and a receiver never runs its handler on unopened data.
A client gets its sealed replies opened (redacted after forget, an error without the service);
an admin's `fuse agents history` shows a sealed message opened, "[redacted]" after `fuse
forget`, and reports a value moved into another message instead of showing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import msgspec
import nats
import pytest
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context, wire
from newfuse.agents.history import History
from newfuse.agents.replay import Replay
from newfuse.errors import (
    InvalidPayloadError,
    KeyServiceBusyError,
    KeyServiceError,
    KeyServiceRefusedError,
    KeyServiceUnavailableError,
    RequestFailedError,
)
from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats import Subjects, connect
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.signing import IDENTITY, SIGNATURE, Signer, signed
from newfuse.schemas import (
    REDACTED,
    A2AMessage,
    A2AMetadata,
    DataSubject,
    Personal,
    new_event_id,
)
from newfuse.security import (
    KeyService,
    KeyServiceClient,
    KVKeyStore,
    SubjectCipher,
    forget,
    use_keys,
)
from newfuse.security.identities import IdentityStore
from newfuse.security.key_service import (
    MAX_FIELDS,
    MAX_REQUEST_BYTES,
    MAX_VALUE_BYTES,
    SealField,
    Topics,
)
from support import SecuredBus, anonymous_keys, new_prefix, run_fuse, secured_nats, wait_for

EMAIL = "alice@example.com"


class Intake(msgspec.Struct, frozen=True, kw_only=True):
    customer: Annotated[str, DataSubject()]
    email: Annotated[str, Personal()]
    plan: str


seen: list[tuple[str, tuple[str, ...]]] = []
bob = Agent("bob")
carol = Agent("carol", max_attempts=1)


@bob.handler("intake")
async def intake(ctx: Context, body: Intake) -> dict[str, str]:
    seen.append((body.email, ctx.redacted))
    ctx.task_status("completed", text="taken")  # records the message handled: as stored
    return {"plan": body.plan}


@bob.handler("lookup")
async def lookup(ctx: Context, body: dict[str, str]) -> Intake:
    return Intake(customer=body["customer"], email=EMAIL, plan="found")  # sealed by the runtime


@bob.handler("note")
async def note(ctx: Context, body: dict[str, str]) -> None:
    seen.append((body["text"], ctx.redacted))


@carol.handler("intake")
async def carol_intake(ctx: Context, body: Intake) -> dict[str, str]:
    seen.append((body.email, ctx.redacted))
    return {"plan": body.plan}


class Secure(SecuredBus):
    async def store(self, admin: Client) -> EventStore:
        """The admin's event store, with the keys (what `fuse forget` uses)."""
        credentials = self.identities.credentials("admin")
        store = await open_event_store(self.server.url, credentials=credentials)
        use_keys(store, await KVKeyStore.open(admin, "fuse"), owns_keys=True)
        return store

    def key_service(
        self, rate: float | None = None, topics: Topics | None = None, *, name: str = "keys"
    ) -> contextlib.AbstractAsyncContextManager[KeyService]:

        def read_by(identity: str) -> tuple[str, ...]:  # fuse dev reads them from identities
            return ("news",) if identity == "bob-1" else ()

        return super().key_service(rate, topics or read_by, name=name)


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secure]:
    folder: Path = tmp_path_factory.mktemp("sealing")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("keys", "service")
    identities.add(
        "alice-1",
        "agent",
        agent="alice/1",
        send_to=["bob", "carol", "dave"],
        publish_topics=["news"],
    )
    identities.add("dave-1", "agent", agent="dave/1")  # never runs: what is sent to it stays
    identities.add("bob-1", "agent", agent="bob/1")
    identities.add("carol-1", "agent", agent="carol/1")
    identities.add("eve-1", "agent", agent="eve/1", send_to=["bob"])
    async with secured_nats(folder, identities) as server:
        yield Secure(server, identities)


async def last_on(admin: Client, subject: str) -> tuple[int, bytes]:
    """The position and body of the last message on `subject` (read as the admin)."""
    found = await DirectGet(admin, "FUSE_A2A", timeout=5).last_for(subject, "test")
    assert found is not None
    return sequence_of(found), found.data


async def test_an_agent_seals_a_field_the_log_holds_ciphertext_and_only_its_parties_open_it(
    secure: Secure,
) -> None:
    seen.clear()
    names = ("admin", "alice-1", "bob-1", "eve-1")
    admin, alice_nc, bob_nc, eve_nc = [await secure.connect(name) for name in names]
    store = await secure.store(admin)
    try:
        async with (
            secure.key_service(),
            bob.run(bob_nc, key="1", fast_path=False),
            AgentClient(alice_nc, sender="alice/1") as alice,
        ):
            reply = await alice.request(
                "bob", "intake", Intake(customer="c-1", email=EMAIL, plan="pro"), timeout=30
            )
            assert reply.payload == {"plan": "pro"}
            assert seen == [(EMAIL, ())]  # the handler saw plaintext

            position, body = await last_on(admin, "fuse.a2a.bob")
            assert EMAIL.encode() not in body  # the log holds ciphertext
            stored = json.loads(body)["data"]["payload"]
            assert stored["email"]["enc"] == "A256GCM" and stored["email"]["sub"] == "c-1"
            assert stored["plan"] == "pro" and stored["customer"] == "c-1"

            everything = DirectGet(admin, "FUSE_A2A", timeout=5).messages("fuse.a2a.>", "test")
            bodies = [msg.data async for msg in everything]
            assert len(bodies) > 2 and not [b for b in bodies if EMAIL.encode() in b]

            alice_keys, bob_keys, eve_keys = (
                KeyServiceClient(nc) for nc in (alice_nc, bob_nc, eve_nc)
            )
            for parties in (alice_keys, bob_keys):  # its sender and its recipient
                opened = await parties.open(position)
                assert json.loads(bytes(opened.values["$.payload.email"])) == EMAIL
                assert opened.redacted == []
            with pytest.raises(KeyServiceRefusedError, match=r"'eve-1' may not open"):
                await eve_keys.open(position)

            await forget(store, "c-1", by="test", reason="erasure request")

            async def redacted_for_both() -> bool:
                answers = [await keys.open(position) for keys in (alice_keys, bob_keys)]
                return all(a.redacted == ["$.payload.email"] for a in answers)

            await wait_for(redacted_for_both, timeout=10)
            assert bytes((await bob_keys.open(position)).values["$.payload.email"]) == b"null"
    finally:
        await store.close()
        for nc in (admin, alice_nc, bob_nc, eve_nc):
            await nc.close()


async def test_a_handler_reads_a_forgotten_subjects_field_as_its_replacement(
    secure: Secure,
) -> None:
    seen.clear()
    admin, alice_nc, bob_nc = [await secure.connect(n) for n in ("admin", "alice-1", "bob-1")]
    store = await secure.store(admin)
    try:
        async with secure.key_service() as service:
            async with AgentClient(alice_nc, sender="alice/1") as alice:
                await alice.send("bob", "intake", Intake(customer="c-2", email=EMAIL, plan="a"))
            await forget(store, "c-2", by="test")

            async def forgotten() -> bool:  # the service heard the purge
                return await service.cipher.keys.get("c-2") is None

            await wait_for(forgotten)
            async with bob.run(bob_nc, key="1", fast_path=False):
                await wait_for(lambda: asyncio.sleep(0, bool(seen)), timeout=30)
        assert seen == [(REDACTED, ("$.payload.email",))]
    finally:
        await store.close()
        for nc in (admin, alice_nc, bob_nc):
            await nc.close()


async def test_forged_open_requests_are_refused(secure: Secure) -> None:
    admin, alice_nc = await secure.connect("admin"), await secure.connect("alice-1")
    eve_creds = secure.identities.credentials("eve-1")
    dave_creds = secure.identities.credentials("dave-1")
    # eve with plain nats-py: no newfuse signing, her own login
    raw = await nats.connect(
        secure.server.url, nkeys_seed_str=eve_creds.seed, inbox_prefix=eve_creds.inbox_prefix
    )
    try:
        async with secure.key_service() as service:
            async with AgentClient(alice_nc, sender="alice/1") as alice:
                await alice.send("dave", "intake", Intake(customer="c-3", email=EMAIL, plan="a"))
            position, _ = await last_on(admin, "fuse.a2a.dave")
            subject = "fuse.keys.open"

            async def ask(body: bytes, headers: dict[str, str] | None) -> tuple[str, str]:
                answer = await raw.request(subject, body, timeout=5, headers=headers)
                found = answer.headers or {}
                assert EMAIL.encode() not in answer.data
                return found.get("Nats-Service-Error-Code", ""), found.get("Nats-Service-Error", "")

            claim = json.dumps({"position": position, "requester": "dave/1"}).encode()
            code, error = await ask(claim, None)  # unsigned, naming dave
            assert code == "403" and "not signed" in error

            # dave's certificate, eve's signature
            eve = Signer(eve_creds.seed, dave_creds.certificate)
            code, error = await ask(claim, eve.headers(subject, claim))
            assert code == "403" and "the signature is not 'dave-1''s" in error

            # dave's own signed request, copied: the answer would go to eve's inbox
            copied = Signer(dave_creds.seed, dave_creds.certificate).headers(subject, claim)
            code, error = await ask(claim, copied)
            assert code == "403" and "not to the inbox of 'dave-1'" in error

            # a garbled certificate
            code, error = await ask(claim, {IDENTITY: "x.y", SIGNATURE: "z"})
            assert code == "403" and "malformed" in error
            assert service.refused == 4
    finally:
        await raw.close()
        for nc in (admin, alice_nc):
            await nc.close()


async def test_hostile_requests_get_clear_errors_and_the_service_goes_on(secure: Secure) -> None:
    eve_nc = await secure.connect("eve-1")
    keys = KeyServiceClient(eve_nc)
    try:
        async with secure.key_service() as service:

            async def seal(body: object) -> tuple[str, str]:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                subject = "fuse.keys.seal"
                signature = signed(eve_nc, subject, data, {})  # (newfuse signs its own)
                answer = await eve_nc.request(subject, data, timeout=5, headers=signature)
                found = answer.headers or {}
                return found.get("Nats-Service-Error-Code", ""), found.get("Nats-Service-Error", "")

            one = {"path": "$.payload.email", "subject": "c-9", "value": "x"}
            cases: list[tuple[object, str]] = [
                (b"not json", "not a seal request"),
                (b"[1, 2]", "not a seal request"),
                ({"event": "e-1", "fields": [one], "more": 1}, "not a seal request"),
                ({"event": "e-1", "fields": []}, f"give 1 to {MAX_FIELDS}"),
                ({"event": "e-1", "fields": [one] * 2}, "is given twice"),
                (
                    {"event": "e-1", "fields": [{**one, "path": f"$.f{i}"} for i in range(65)]},
                    f"give 1 to {MAX_FIELDS}",
                ),
                ({"event": "e 1", "fields": [one]}, "`event`"),
                ({"event": "e-1", "fields": [{**one, "path": "email"}]}, "must start with `$.`"),
                ({"event": "e-1", "fields": [{**one, "subject": ""}]}, "data subject"),
                (
                    {"event": "e-1", "fields": [{**one, "value": "x" * MAX_VALUE_BYTES}]},
                    f"at most {MAX_VALUE_BYTES}",
                ),
                (b" " * (MAX_REQUEST_BYTES + 1), f"at most {MAX_REQUEST_BYTES}"),
                # a value nested 20,000 deep: msgspec's RecursionError, were it decoded
                (
                    b'{"event": "e-1", "fields": [{"path": "$.payload.email", "subject": "c-9",'
                    b' "value": ' + b"[" * 20_000 + b"]" * 20_000 + b"}]}",
                    "the body nests 20003 deep",
                ),
            ]
            for body, reason in cases:
                code, error = await seal(body)
                assert code == "400", (body, error)
                assert reason in error, (reason, error)
            with pytest.raises(KeyServiceError, match=r"\(404\).*no message at position"):
                await keys.open(10**9)
            with pytest.raises(KeyServiceError, match=r"\(400\).*not a open request"):
                await keys._ask("open", json.dumps({"position": "one"}).encode())
            # found by subject and event id: a subject of the message stream, no wildcards
            finds: list[tuple[str | None, str | None, str]] = [
                ("fuse.a2a.>", "e-1", r"\(400\).*without wildcards"),
                ("fuse.ev.agent.x", "e-1", r"\(400\).*a subject of fuse\.a2a\.>"),
                ("fuse.a2a._reply.eve-1", None, r"\(400\).*name the event id"),
                ("fuse.a2a._reply.eve-1", "e 1", r"\(400\).*`event`"),
                ("fuse.a2a._reply.eve-1", "e-1", r"\(404\).*no message of event 'e-1'"),
            ]
            for subject, event, error in finds:
                with pytest.raises(KeyServiceError, match=error):
                    await keys.open(1, subject=subject, event=event)
            assert service.refused == len(cases) + 2 + len(finds)
            # still serving: anyone may seal for anyone (sealing discloses nothing)
            field = SealField(path="$.payload.email", subject="c-9", value=msgspec.Raw(b'"x"'))
            sealed = await keys.seal("e-1", [field])
            assert (sealed[0].enc, sealed[0].sub) == ("A256GCM", "c-9")
            # unsigned (plain nats-py): it cannot be told who asks, so it is not served
            code, error = await seal_unsigned(eve_nc, [one])
            assert code == "403" and "not signed" in error
    finally:
        await eve_nc.close()


async def test_without_the_key_service_nothing_is_sent_or_handled_unopened(
    secure: Secure,
) -> None:
    seen.clear()
    admin, alice_nc, bob_nc, carol_nc = [
        await secure.connect(n) for n in ("admin", "alice-1", "bob-1", "carol-1")
    ]
    try:
        async with AgentClient(alice_nc, sender="alice/1") as alice:
            async with secure.key_service():
                asked = asyncio.create_task(
                    alice.request(
                        "carol", "intake", Intake(customer="c-4", email=EMAIL, plan="b"), timeout=60
                    )
                )

                async def stored() -> bool:
                    found = await DirectGet(admin, "FUSE_A2A", timeout=5).last_for(
                        "fuse.a2a.carol", "test"
                    )
                    return found is not None

                await wait_for(stored, timeout=30)
            # the key service is gone: a sender is told at once, nothing is stored in the clear
            with pytest.raises(KeyServiceUnavailableError, match=r"is a key service running"):
                await alice.send("carol", "intake", Intake(customer="c-4", email=EMAIL, plan="c"))
            with pytest.raises(InvalidPayloadError, match=r"through the log only"):
                await alice.call("carol", "intake", Intake(customer="c-4", email=EMAIL, plan="d"))
            # and a receiver never runs its handler on fields it could not open
            async with carol.run(carol_nc, key="1", fast_path=False) as running:
                with pytest.raises(RequestFailedError, match=r"KeyServiceUnavailableError"):
                    await asked
                await wait_for(lambda: asyncio.sleep(0, running.dead_lettered == 1))
            assert seen == []
            # a payload that only mentions the cipher's name is not sent to the key service
            async with bob.run(bob_nc, key="1", fast_path=False):
                await alice.send("bob", "note", {"text": "A256GCM, said the manual"})
                await wait_for(lambda: asyncio.sleep(0, bool(seen)), timeout=30)
        assert seen == [("A256GCM, said the manual", ())]
    finally:
        for nc in (admin, alice_nc, bob_nc, carol_nc):
            await nc.close()


async def test_on_a_bus_without_identities_the_requester_is_who_it_claims(nats_url: str) -> None:
    seen.clear()
    async with anonymous_keys(nats_url) as (nc, prefix):
        async with (
            bob.run(nc, key="1", prefix=prefix, fast_path=False),
            AgentClient(nc, prefix=prefix, sender="alice/1") as alice,
        ):
            intake = Intake(customer="c-5", email=EMAIL, plan="pro")
            assert (await alice.request("bob", "intake", intake, timeout=30)).payload
            assert seen == [(EMAIL, ())]
            stream = Subjects(prefix).message_stream_name
            found = await DirectGet(nc, stream, timeout=5).last_for(f"{prefix}.a2a.bob", "test")
            assert found is not None and EMAIL.encode() not in found.data
            position = sequence_of(found)
            # no signatures to check: a guard against mistakes (as a policy is there)
            with pytest.raises(KeyServiceRefusedError, match=r"'eve/1' may not open"):
                await KeyServiceClient(nc, prefix=prefix, requester="eve/1").open(position)
            opened = await KeyServiceClient(nc, prefix=prefix, requester="bob/1").open(position)
            assert json.loads(bytes(opened.values["$.payload.email"])) == EMAIL


async def test_a_sealed_reply_is_opened_for_the_client_its_reply_subject_names(
    secure: Secure,
) -> None:
    admin, alice_nc, bob_nc, eve_nc = [
        await secure.connect(name) for name in ("admin", "alice-1", "bob-1", "eve-1")
    ]
    try:
        async with (
            secure.key_service(),
            bob.run(bob_nc, key="1", fast_path=False),
            AgentClient(alice_nc, sender="alice/1") as alice,
        ):
            reply = await alice.request("bob", "lookup", {"customer": "c-6"}, timeout=30)
            # the client opens it through the key service; its message stays as stored
            assert reply.payload == {"customer": "c-6", "email": EMAIL, "plan": "found"}
            assert reply.redacted == ()
            assert reply.message is not None and reply.message.payload["email"]["enc"] == "A256GCM"
            position, body = await last_on(admin, "fuse.a2a._reply.alice-1")
            assert EMAIL.encode() not in body
            opened = await KeyServiceClient(alice_nc).open(position)  # its reply subject's
            assert json.loads(bytes(opened.values["$.payload.email"])) == EMAIL
            with pytest.raises(KeyServiceRefusedError, match=r"'eve-1' may not open"):
                await KeyServiceClient(eve_nc).open(position)
            # and it is found like any ADR-32 service
            ping = json.loads((await admin.request("$SRV.PING.newfuse-keys", b"", timeout=5)).data)
            assert ping["name"] == "newfuse-keys"
    finally:
        for nc in (admin, alice_nc, bob_nc, eve_nc):
            await nc.close()


@contextlib.asynccontextmanager
async def plain_bus(nats_url: str) -> AsyncIterator[tuple[Client, str, KVKeyStore]]:
    """A connection on the bus without identities, a prefix of its own and its key store."""
    prefix = new_prefix()
    nc = await connect(nats_url)
    try:
        keys = await KVKeyStore.open(nc, prefix)
        try:
            yield nc, prefix, keys
        finally:
            await keys.close()
    finally:
        await nc.close()


async def test_a_reply_asked_again_reads_redacted_after_forget_and_fails_without_the_service(
    nats_url: str,
) -> None:
    async with plain_bus(nats_url) as (nc, prefix, keys):
        async with (
            bob.run(nc, key="1", prefix=prefix, fast_path=False),
            AgentClient(nc, prefix=prefix, sender="alice/1") as alice,
        ):
            async with KeyService(nc, await KVKeyStore.open(nc, prefix), prefix=prefix):
                ask = alice.request_once("bob", "lookup", {"customer": "c-7"}, key="k-7")
                reply = await ask  # without identities, it names its reply token
                assert reply.payload["email"] == EMAIL and reply.redacted == ()
                await keys.forget("c-7")

                async def forgotten() -> bool:  # the same stored reply, found again
                    again = alice.request_once("bob", "lookup", {"customer": "c-7"}, key="k-7")
                    return (await again).redacted == ("$.payload.email",)

                await wait_for(forgotten, timeout=10)
                again = alice.request_once("bob", "lookup", {"customer": "c-7"}, key="k-7")
                assert (await again).payload == {"customer": "c-7", "email": None, "plan": "found"}
            # the service is gone: an error, never the reply silently redacted
            with pytest.raises(KeyServiceUnavailableError, match=r"is a key service running"):
                await alice.request_once("bob", "lookup", {"customer": "c-7"}, key="k-7")


async def test_a_replay_with_the_keys_hands_the_handler_what_the_runtime_did(
    nats_url: str,
) -> None:
    async with plain_bus(nats_url) as (nc, prefix, keys):
        async with (
            KeyService(nc, await KVKeyStore.open(nc, prefix), prefix=prefix, owns_keys=True),
            bob.run(nc, key="1", prefix=prefix, fast_path=False),
            AgentClient(nc, prefix=prefix, sender="alice/1") as alice,
        ):
            intake = Intake(customer="c-8", email=EMAIL, plan="pro")
            await alice.request("bob", "intake", intake, timeout=30, context_id="conv-8")

        async def replayed(cipher: SubjectCipher | None) -> tuple[str, tuple[str, ...]]:
            seen.clear()
            replay = Replay(nc, bob, prefix=prefix, cipher=cipher)
            [result] = [r async for r in replay.messages("conv-8")]
            assert result.error is None and replay.skipped == []
            [handed] = seen
            return handed

        assert await replayed(SubjectCipher(keys)) == (EMAIL, ())
        assert await replayed(None) == (REDACTED, ("$.payload.email",))  # no keys
        await keys.forget("c-8")
        assert await replayed(SubjectCipher(keys)) == (REDACTED, ("$.payload.email",))


def history_of(secure: Secure, message_id: str) -> tuple[dict[str, object], str]:
    """`fuse agents history --agent dave --json` as the admin: the turn of `message_id` and
    what it said on stderr."""
    shown = run_fuse("agents", "history", "--agent", "dave", "--json", env=secure.admin_env())
    turns = [json.loads(line) for line in shown.stdout.splitlines()]
    return next(t for t in turns if t["id"] == message_id), shown.stderr


@contextlib.asynccontextmanager
async def admin_and_alice(secure: Secure) -> AsyncIterator[tuple[Client, AgentClient]]:
    """The admin's connection and alice/1's client, with a key service running."""
    admin, alice_nc = [await secure.connect(name) for name in ("admin", "alice-1")]
    try:
        async with secure.key_service(), AgentClient(alice_nc, sender="alice/1") as alice:
            yield admin, alice
    finally:
        for nc in (admin, alice_nc):
            await nc.close()


async def test_an_admins_history_opens_a_sealed_message_and_redacts_it_after_forget(
    secure: Secure,
) -> None:
    async with admin_and_alice(secure) as (admin, alice):
        sent = await alice.send("dave", "intake", Intake(customer="c-h", email=EMAIL, plan="b"))
        _, body = await last_on(admin, "fuse.a2a.dave")
        assert EMAIL.encode() not in body  # stored sealed

        turn, _ = history_of(secure, sent)  # the admin's keys open it
        assert json.loads(str(turn["text"])) == {"customer": "c-h", "email": EMAIL, "plan": "b"}
        assert "redacted" not in turn
        # a reader without keys shows a marker, never the ciphertext
        keyless = [t async for t in History(admin).turns(agent="dave") if t.id == sent]
        assert json.loads(keyless[0].text)["email"] == REDACTED
        assert keyless[0].redacted == ("$.payload.email",)

        run_fuse("forget", "c-h", "--reason", "erasure", env=secure.admin_env())
        turn, _ = history_of(secure, sent)
        assert json.loads(str(turn["text"])) == {"customer": "c-h", "email": REDACTED, "plan": "b"}
        assert turn["redacted"] == ["$.payload.email"] and turn["sender"] == "alice/1"
        table = run_fuse("agents", "history", "--agent", "dave", env=secure.admin_env()).stdout
        [row] = [line for line in table.splitlines() if '"c-h"' in line]
        assert '"email":"[redacted]"' in row and '"plan":"b"' in row


async def test_a_moved_sealed_value_is_reported_by_the_history_and_refused_to_the_client(
    secure: Secure,
) -> None:
    async with admin_and_alice(secure) as (admin, alice):
        sent = await alice.send("dave", "intake", Intake(customer="c-m", email=EMAIL, plan="b"))
        _, body = await last_on(admin, "fuse.a2a.dave")
        sealed = json.loads(body)["data"]["payload"]["email"]

        def forged(
            stream: str, in_reply_to: str | None = None
        ) -> tuple[str, bytes, dict[str, str]]:
            event_id = new_event_id()
            message = A2AMessage(
                type="intake",
                payload={"customer": "c-m", "email": sealed, "plan": "moved"},
                metadata=A2AMetadata(sender="alice/1"),
                message_id=event_id,
                in_reply_to=in_reply_to,
            )
            encoded, wire_headers = wire.encode(
                stream, wire.MESSAGE_TYPE, message, event_id=event_id
            )
            return event_id, encoded, wire_headers

        # the value copied into another message (the admin may write anywhere)
        moved, encoded, wire_headers = forged("a2a.dave")
        ack = await admin.jetstream().publish("fuse.a2a.dave", encoded, headers=wire_headers)
        shown = run_fuse("agents", "history", "--agent", "dave", "--json", env=secure.admin_env())
        ids = [json.loads(line)["id"] for line in shown.stdout.splitlines()]
        assert sent in ids and moved not in ids  # the rest reads on
        assert f"skipped: position {ack.seq} on fuse.a2a.dave" in shown.stderr
        assert f"sealed field $.payload.email of event '{moved}'" in shown.stderr
        assert "does not authenticate" in shown.stderr

        # a reply holding the copied value: the client reports it, it is not handed over
        request_id = new_event_id()
        asked = asyncio.create_task(
            alice.request("dave", "lookup", {}, message_id=request_id, timeout=30)
        )

        async def requested() -> bool:
            found = await DirectGet(admin, "FUSE_A2A", timeout=5).last_for("fuse.a2a.dave", "test")
            return found is not None and json.loads(found.data)["id"] == request_id

        await wait_for(requested, timeout=30)
        _, encoded, wire_headers = forged("reply.alice-1", in_reply_to=request_id)
        await admin.jetstream().publish("fuse.a2a._reply.alice-1", encoded, headers=wire_headers)
        with pytest.raises(KeyServiceRefusedError, match=r"no record that event .* sealed"):
            await asked


async def seal_unsigned(nc: Client, fields: list[dict[str, str]]) -> tuple[str, str]:
    body = json.dumps({"event": "e-1", "fields": fields}).encode()
    answer = await nc.request("fuse.keys.seal", body, timeout=5)
    found = answer.headers or {}
    return found.get("Nats-Service-Error-Code", ""), found.get("Nats-Service-Error", "")


async def test_an_identity_that_asks_too_often_is_told_to_wait(secure: Secure) -> None:
    eve_nc, alice_nc = await secure.connect("eve-1"), await secure.connect("alice-1")
    field = SealField(path="$.payload.email", subject="c-7", value=msgspec.Raw(b'"x"'))
    try:
        async with secure.key_service(rate=5):  # bursts of 10
            eve = KeyServiceClient(eve_nc)
            for _ in range(10):
                await eve.seal("e-1", [field])
            with pytest.raises(KeyServiceBusyError, match=r"\(429\).*'eve-1' asks more than 5"):
                await eve.seal("e-1", [field])
            assert KeyServiceBusyError.retryable
            await KeyServiceClient(alice_nc).seal("e-2", [field])  # a bucket per identity
            # an event id is whoever sealed it first's
            with pytest.raises(KeyServiceError, match=r"\(409\).*sealed for 'eve' first"):
                await KeyServiceClient(alice_nc).seal("e-1", [field])
    finally:
        for nc in (eve_nc, alice_nc):
            await nc.close()


async def test_a_topic_message_opens_for_the_agents_that_read_the_topic(secure: Secure) -> None:
    admin, alice_nc, bob_nc, eve_nc = [
        await secure.connect(name) for name in ("admin", "alice-1", "bob-1", "eve-1")
    ]
    try:
        async with secure.key_service(), AgentClient(alice_nc, sender="alice/1") as alice:
            await alice.publish("news", "intake", Intake(customer="c-8", email=EMAIL, plan="n"))
            position, body = await last_on(admin, "fuse.a2a._topic.news")
            assert EMAIL.encode() not in body
            opened = await KeyServiceClient(bob_nc).open(position)
            assert json.loads(bytes(opened.values["$.payload.email"])) == EMAIL
            with pytest.raises(KeyServiceRefusedError, match=r"'eve-1' may not open"):
                await KeyServiceClient(eve_nc).open(position)
    finally:
        for nc in (admin, alice_nc, bob_nc, eve_nc):
            await nc.close()


async def test_a_copied_sealed_value_under_its_event_id_does_not_open_for_its_copier(
    secure: Secure,
) -> None:
    """Eve has alice's ciphertext (from a stolen backup, say) and stores it again in a message
    of her own under the original event id, past the duplicate window, which she may then ask
    to open as its sender: the service knows alice sealed that event, so it refuses."""
    admin, alice_nc, eve_nc = [await secure.connect(n) for n in ("admin", "alice-1", "eve-1")]
    js = admin.jetstream()
    config = (await js.stream_info("FUSE_A2A")).config
    window = config.duplicate_window
    try:
        await js.update_stream(dataclasses.replace(config, duplicate_window=0.1))
        async with (
            secure.key_service(),
            AgentClient(alice_nc, sender="alice/1") as alice,
            AgentClient(eve_nc, sender="eve/1") as eve,
        ):
            await alice.send("dave", "intake", Intake(customer="c-10", email=EMAIL, plan="x"))
            _, body = await last_on(admin, "fuse.a2a.dave")
            original = json.loads(body)
            copied = A2AMessage(
                type="intake",
                payload=original["data"]["payload"],
                metadata=A2AMetadata(sender="eve/1"),
                message_id=original["id"],
            )

            async def stored_again() -> bool:  # once the duplicate window has passed
                ack = await eve.record(
                    "fuse.a2a.bob", "a2a.bob", "a2a.message", copied, event_id=original["id"]
                )
                return not ack.duplicate

            await wait_for(stored_again)
            position, _ = await last_on(admin, "fuse.a2a.bob")
            with pytest.raises(KeyServiceRefusedError, match=r"sealed for 'alice'"):
                await KeyServiceClient(eve_nc).open(position)
    finally:
        await js.update_stream(dataclasses.replace(config, duplicate_window=window))
        for nc in (admin, alice_nc, eve_nc):
            await nc.close()
