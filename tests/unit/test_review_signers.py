"""Who may write what in a review, when events carry their signer: the fold's rules, and the
certificates that name review groups (no server: the events and identities are built here)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from newfuse.core.review import ReviewState, review_stream
from newfuse.errors import IdentityError
from newfuse.nats import Subjects
from newfuse.nats.signing import Signer, Trust, issue
from newfuse.schemas import (
    Certified,
    Envelope,
    RecordedEvent,
    ReviewApproved,
    ReviewClaimed,
    ReviewEscalated,
    ReviewExpired,
    ReviewRequested,
    new_event_id,
    utcnow,
)
from newfuse.security.identities import IdentityStore, permissions

REVIEW = "rv0123456789abcdef"
ORCHESTRATOR = Certified(name="orchestrator", role="service", key="U")
ADA = Certified(name="ada", role="reviewer", key="U", groups=("ops",))
LEA = Certified(name="lea", role="reviewer", key="U", groups=("leads",))
BOSS = Certified(name="boss", role="admin", key="U", groups=("ops", "leads"))


def _events(*written: tuple[Any, Certified | None]) -> list[RecordedEvent]:
    return [
        RecordedEvent(
            position=version,
            envelope=Envelope(
                id=new_event_id(),
                stream=review_stream(REVIEW),
                type="review.x",
                version=version,
                timestamp=utcnow(),
                data=msgspec.Raw(b"{}"),
            ),
            data=data,
            signer=signer,
        )
        for version, (data, signer) in enumerate(written, 1)
    ]


def _request(groups: list[str] | None = None) -> ReviewRequested:
    return ReviewRequested(
        review_id=REVIEW,
        saga_id="s1",
        step="ship",
        summary="ship it",
        action="shipping.ship",
        groups=groups or ["ops"],
        deadline=utcnow() + timedelta(hours=1),
    )


def _approved(by: str) -> ReviewApproved:
    return ReviewApproved(review_id=REVIEW, saga_id="s1", by=by, comment=f"{by} says go")


def test_unsigned_a_review_is_what_its_events_say() -> None:
    state = ReviewState.fold(REVIEW, _events((_request(), None), (_approved("ada"), None)))
    assert (state.status, state.decided_by, state.ignored) == ("approved", "ada", [])


def test_signed_a_decision_counts_only_from_the_reviewer_it_names_in_one_of_the_groups() -> None:
    state = ReviewState.fold(
        REVIEW,
        _events(
            (_request(), ORCHESTRATOR),
            (_approved("ada"), None),
            (_approved("ada"), LEA),
            (_approved("lea"), LEA),
            (ReviewClaimed(review_id=REVIEW, saga_id="s1", by="boss"), BOSS),
            (_approved("boss"), BOSS),
        ),
        signed=True,
    )
    assert (state.status, state.decided_by, state.claimed_by) == ("approved", "boss", "boss")
    assert [line.split(": ", 1)[1] for line in state.ignored] == [
        "unsigned, not by ada, whom it names",
        "signed by lea (reviewer), not by ada, whom it names",
        "lea's certificate names leads, not ops",
    ]


def test_signed_only_the_bus_opens_a_review_and_applies_its_deadline() -> None:
    escalated = ReviewEscalated(
        review_id=REVIEW, saga_id="s1", groups=["leads"], deadline=utcnow() + timedelta(hours=1)
    )
    expired = ReviewExpired(review_id=REVIEW, saga_id="s1", deadline=utcnow())
    state = ReviewState.fold(
        REVIEW,
        _events(
            (_request(["ada-only"]), ADA),  # a reviewer opening a review for a group of hers
            (_request(), None),
            (_request(), ORCHESTRATOR),
            (expired, ADA),
            (escalated, ORCHESTRATOR),
            (_approved("ada"), ADA),  # ops no longer decides: it went to leads
            (_approved("lea"), LEA),
        ),
        signed=True,
    )
    assert (state.status, state.groups, state.decided_by) == ("approved", ["leads"], "lea")
    assert [line.split(": ", 1)[1] for line in state.ignored] == [
        "signed by ada (reviewer), not by the bus (an admin or a service)",
        "unsigned, not by the bus (an admin or a service)",
        "signed by ada (reviewer), not by the bus (an admin or a service)",
        "ada's certificate names ops, not leads",
    ]


def test_a_certificate_names_the_review_groups_of_a_reviewer_or_an_admin(tmp_path: Path) -> None:
    identities = IdentityStore(tmp_path / "auth")
    identities.add("admin", "admin", groups=["leads"])
    ada = identities.add("ada", "reviewer", groups=["ops", "billing"])
    credentials = identities.credentials("ada")
    signer = Signer(credentials.seed, credentials.certificate)
    headers = signer.headers("fuse.ev.review.x", b"{}")
    holder = Trust(credentials.trust).sender("fuse.ev.review.x", b"{}", headers)
    assert (holder.name, holder.role, holder.groups) == ("ada", "reviewer", ("ops", "billing"))
    assert identities.get("ada").groups == ada.groups == ("ops", "billing")
    allowed = permissions(ada, Subjects("fuse"))
    assert allowed is not None
    published = allowed["publish"]["allow"]
    assert [s for s in published if s.startswith("fuse.")] == [
        "fuse.ev.review.*",
        "fuse.ev.feedback.*",
    ]
    with pytest.raises(IdentityError, match="a reviewer acts for one or more --group"):
        identities.add("bob", "reviewer")
    with pytest.raises(
        IdentityError, match="--group is for the roles admin and reviewer, not agent"
    ):
        identities.add("echo-1", "agent", agent="echo/1", groups=["ops"])
    with pytest.raises(IdentityError, match="group 'o ps': use 1-64 letters"):
        identities.add("cy", "reviewer", groups=["o ps"])


def test_a_certificate_issued_before_groups_still_verifies_and_names_none(tmp_path: Path) -> None:
    identities = IdentityStore(tmp_path / "auth")
    identities.add("admin", "admin")
    admin = identities.credentials("admin")
    old = msgspec.json.encode({"name": "old", "role": "service", "key": admin.trust[0]})
    claims = msgspec.json.decode(old, type=Certified)
    assert claims.groups == ()
    certificate = issue(admin.seed, claims)
    signer = Signer(admin.seed, certificate)
    headers = signer.headers("fuse.ev.a.b", b"x")
    assert Trust(admin.trust).sender("fuse.ev.a.b", b"x", headers).groups == ()
