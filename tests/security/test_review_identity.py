"""A review's decision is bound to a signed identity, on a real secured nats-server.

The server runs with the authorization `server_config` writes for an admin, the orchestrator
(a service), the reviewers ada and bob of group ops and the reviewer lea of group leads. Every
store here connects with credentials, so it checks who signed each event it reads: a saga's
review step runs once ada approves; an approval published with plain nats-py (unsigned), one
that bob signs in ada's name, one with ada's certificate and a signature that is not hers, and
one by lea (not of the group) are ignored by the review's fold, and the saga waits on. The CLI
takes the reviewer from the credentials and refuses a `--as` that is someone else."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from newfuse.core import Orchestrator, Saga, StepContext
from newfuse.core import review as reviews
from newfuse.core.orchestrator import read_saga, saga_stream
from newfuse.core.review import Review, Reviewer, ReviewState
from newfuse.errors import ReviewerIdentityError, ReviewerNotAllowedError
from newfuse.eventstore import EventFilter, EventStore, InvalidEventReport, open_event_store
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import NatsServer, connect
from newfuse.nats.signing import IDENTITY, SIGNATURE, Signer
from newfuse.schemas import (
    Envelope,
    NewEvent,
    ReviewApproved,
    ReviewInputEdited,
    new_event_id,
    utcnow,
)
from newfuse.security.identities import IdentityStore
from support import run_fuse, secured_nats, wait_for


@dataclass
class Secure:
    server: NatsServer
    identities: IdentityStore

    async def store(self, name: str, **options: Any) -> EventStore:
        return await open_event_store(
            self.server.url, prefix="fuse", credentials=self.identities.credentials(name), **options
        )

    async def raw(self, name: str) -> Client:
        """A plain nats-py connection as `name`: it signs nothing."""
        return await nats.connect(
            self.server.url,
            nkeys_seed_str=self.identities.seed(name),
            inbox_prefix=f"_INBOX_{name}",
            allow_reconnect=False,
        )


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secure]:
    folder = tmp_path_factory.mktemp("reviewers")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("orchestrator", "service")
    identities.add("ada", "reviewer", groups=["ops"])
    identities.add("bob", "reviewer", groups=["ops"])
    identities.add("lea", "reviewer", groups=["leads"])
    async with secured_nats(folder, identities) as server:
        yield Secure(server, identities)


def _shipping(log: list[Any]) -> Saga:
    saga = Saga("shipping")

    @saga.step("ship", review=Review(group="ops"))
    async def ship(ctx: StepContext) -> None:
        log.append((ctx.input, ctx.review.by if ctx.review else None))

    return saga


async def _pending(store: EventStore, saga_id: str) -> ReviewState:
    review_id = reviews.review_id(saga_id, "ship")

    async def requested() -> bool:
        return (await reviews.read_review(store, review_id)).requested

    await wait_for(requested, timeout=20)
    return await reviews.read_review(store, review_id)


def _forged_body(state: ReviewState, type: str, data: Any, *, version: int) -> bytes:
    """The body of a well-formed event at `version` of the review's stream, as anyone with
    the wire contract can write it."""
    return msgspec.json.encode(
        Envelope(
            id=new_event_id(),
            stream=reviews.review_stream(state.id),
            type=type,
            version=version,
            timestamp=utcnow(),
            data=msgspec.Raw(msgspec.json.encode(data)),
        )
    )


async def _publish_raw(
    secure: Secure, name: str, state: ReviewState, body: bytes, extra: dict[str, str] | None = None
) -> None:
    nc = await secure.raw(name)
    try:
        js = nc.jetstream(timeout=10)
        await js.publish(f"fuse.ev.{reviews.review_stream(state.id)}", body, headers=extra)
    finally:
        await nc.close()


async def test_a_signed_reviewer_approves_and_forged_or_foreign_decisions_are_ignored(
    secure: Secure,
) -> None:
    log: list[Any] = []
    orchestrator = await secure.store("orchestrator")
    ada, bob, lea = [await secure.store(n) for n in ("ada", "bob", "lea")]
    try:
        async with Orchestrator(orchestrator, [_shipping(log)], safety_poll=3600) as orch:
            saga_id = await orch.start("shipping", {"to": "lima"})
            pending = await _pending(ada, saga_id)
            assert pending.signed and pending.groups == ["ops"]

            # 1. plain nats-py as the orchestrator (it may write the log): unsigned
            forged = ReviewInputEdited(
                review_id=pending.id, saga_id=saga_id, by="ada", input={"to": "mallory"}
            )
            await _publish_raw(
                secure,
                "orchestrator",
                pending,
                _forged_body(pending, "review.input_edited", forged, version=2),
            )
            # 2. bob signs an approval in ada's name (our API refuses; the log does not)
            with pytest.raises(ReviewerIdentityError, match="your credentials are bob's"):
                await reviews.approve(bob, pending.id, Reviewer("ada", ("ops",)), "as ada")
            in_adas_name = ReviewApproved(
                review_id=pending.id, saga_id=saga_id, by="ada", comment="bob as ada"
            )
            await bob.append(reviews.review_stream(pending.id), NewEvent(data=in_adas_name), 2)
            # 3. lea is not of group ops: refused by the API, ignored by the fold
            with pytest.raises(ReviewerNotAllowedError, match="lea acts for leads"):
                await reviews.approve(lea, pending.id, reviews.signed_reviewer(lea), "me")
            by_lea = ReviewApproved(review_id=pending.id, saga_id=saga_id, by="lea", comment="x")
            await lea.append(reviews.review_stream(pending.id), NewEvent(data=by_lea), 3)

            state = await reviews.read_review(ada, pending.id)
            assert (state.status, state.input, state.version) == (
                "pending",
                {"to": "lima"},
                4,
            )
            assert [line.split(": ", 1)[1] for line in state.ignored] == [
                "unsigned, not by ada, whom it names",
                "signed by bob (reviewer), not by ada, whom it names",
                "lea's certificate names leads, not ops",
            ]
            assert (await read_saga(orchestrator, saga_id)).status == "active"

            # ada approves under her own identity: the step runs, with the unforged input
            decided = await reviews.approve(ada, pending.id, reviews.signed_reviewer(ada), "go")
            assert (decided.status, decided.decided_by, decided.comment) == (
                "approved",
                "ada",
                "go",
            )
            done = await orch.wait(saga_id, timeout=30)
    finally:
        for store in (orchestrator, ada, bob, lea):
            await store.close()
    assert done.status == "committed"
    assert log == [({"to": "lima"}, "ada")]
    reviewed = done.steps["ship"].reviewed
    assert reviewed is not None and (reviewed.by, reviewed.comment) == ("ada", "go")


async def test_a_signature_that_is_not_the_certificate_holders_is_reported_and_counts_for_nothing(
    secure: Secure,
) -> None:
    reports: list[InvalidEventReport] = []
    admin = await connect(secure.server.url, credentials=secure.identities.credentials("admin"))
    store = JetStreamEventStore(admin, prefix="fuse", on_invalid=reports.append, create=False)
    request_store = await secure.store("orchestrator")
    try:
        stream = f"review.rv{os.urandom(8).hex()}"
        first = await request_store.append(stream, NewEvent(type="note", data={"n": 1}))
        state = ReviewState(stream.partition(".")[2])
        forged = _forged_body(
            state,
            "review.approved",
            ReviewApproved(review_id=state.id, saga_id="s", by="ada"),
            version=first.last_version + 1,
        )
        # ada's certificate, and an Ed25519 signature of something else entirely (the admin's
        # over her certificate's claims)
        ada_certificate = secure.identities.credentials("ada").certificate
        signature = ada_certificate.split(".")[1]
        await _publish_raw(
            secure,
            "orchestrator",
            state,
            forged,
            {IDENTITY: ada_certificate, SIGNATURE: signature},
        )
        garbled = _forged_body(
            state,
            "review.approved",
            ReviewApproved(review_id=state.id, saga_id="s", by="ada"),
            version=first.last_version + 2,
        )
        await _publish_raw(
            secure, "orchestrator", state, garbled, {IDENTITY: "x" * 5000, SIGNATURE: "!"}
        )
        events = [event async for event in store.read(stream)]
        everything = [e async for e in store.read_all(filter=EventFilter(streams=(stream,)))]
    finally:
        await store.close()
        await admin.close()
        await request_store.close()
    assert [(e.version, e.signer.name if e.signer else None) for e in events] == [
        (1, "orchestrator"),
        (2, None),
        (3, None),
    ]
    assert [e.signer is None for e in everything] == [False, True, True]
    # read, then read_all: each reader is told, with the position and the reason
    assert [(r.position, r.error.partition(": ")[2]) for r in reports] == 2 * [
        (events[1].position, "the signature is not 'ada''s, or the message changed"),
        (events[2].position, "Fuse-Identity is not a certificate"),
    ]


async def test_fuse_review_approve_takes_the_reviewer_from_the_credentials(
    secure: Secure,
) -> None:
    log: list[Any] = []
    orchestrator = await secure.store("orchestrator")
    try:
        async with Orchestrator(orchestrator, [_shipping(log)], safety_poll=3600) as orch:
            saga_id = await orch.start("shipping", {"to": "cusco"})
            pending = await _pending(orchestrator, saga_id)
            refused = _review_cli(secure, "bob", "approve", pending.id, "--as", "ada", check=False)
            assert refused.returncode != 0
            assert "reviewer 'ada', signed as 'bob': your credentials are bob's" in refused.stderr
            approved = _review_cli(secure, "ada", "approve", pending.id, "--comment", "ok")
            assert msgspec.json.decode(approved.stdout)["decided_by"] == "ada"
            listed = _review_cli(secure, "ada", "list")
            rows = [msgspec.json.decode(line) for line in listed.stdout.splitlines()]
            mine = [row for row in rows if row["id"] == pending.id]
            assert [(row["status"], row["ignored"]) for row in mine] == [("approved", [])]
            done = await orch.wait(saga_id, timeout=30)
    finally:
        await orchestrator.close()
    assert done.status == "committed" and log == [({"to": "cusco"}, "ada")]
    types = [event.type async for event in _read(secure, saga_stream(saga_id))]
    assert types.count("saga.step_reviewed") == 1


def _review_cli(
    secure: Secure, identity: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`fuse review ... --json` under `identity`'s credentials (no reviewer named otherwise)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("FUSE_REVIEWER", "FUSE_REVIEWER_GROUPS")
    }
    credentials = str(secure.identities.seed_file(identity))
    flags = ["--nats", secure.server.url, "--prefix", "fuse", "--credentials", credentials]
    return run_fuse("review", *args, "--json", *flags, env=env, check=check)


async def _read(secure: Secure, stream: str) -> AsyncIterator[Any]:
    async with await secure.store("admin") as store:
        async for event in store.read(stream):
            yield event


async def test_a_sqlite_store_checks_no_signers_its_events_have_none(
    tmp_path: Path,
) -> None:
    async with await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store:
        assert not store.verifies_signers and store.identity is None
        with pytest.raises(ReviewerIdentityError, match="this connection signs nothing"):
            reviews.signed_reviewer(store)
        await store.append("note.a", NewEvent(type="note", data={}))
        assert [event.signer async for event in store.read("note.a")] == [None]


def test_fuse_auth_add_issues_a_reviewer_certificate_naming_its_groups(tmp_path: Path) -> None:
    env = {**os.environ, "FUSE_STATE_DIR": str(tmp_path / "state")}
    auth = ["auth", "--dir", str(tmp_path / "auth")]
    run_fuse(*auth, "add", "root", "--role", "admin", env=env)
    added = run_fuse(
        *auth,
        "add",
        "cy",
        "--role",
        "reviewer",
        "--group",
        "ops",
        "--group",
        "leads",
        "--json",
        env=env,
    )
    assert msgspec.json.decode(added.stdout)["groups"] == ["ops", "leads"]
    credentials = IdentityStore(tmp_path / "auth").credentials("cy")
    signer = Signer(credentials.seed, credentials.certificate)
    assert signer.holder.groups == ("ops", "leads")
    refused = run_fuse(*auth, "add", "dee", "--role", "reviewer", env=env, check=False)
    assert refused.returncode != 0
    assert "a reviewer acts for one or more --group" in refused.stderr
