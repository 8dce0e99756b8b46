"""Human review of saga steps: a review per stream `review.<id>`, claimed, edited and decided by
people, each write fenced by the stream's expected version.

A step declared with `review=Review(group="ops", deadline=3600)` does not run until someone of
its group approves it. Before the step's action, the orchestrator opens the review (once: the
id is derived from the saga id and the step, and the request is appended expecting no stream)
and the saga waits, holding no lease and no slot; the review's events wake it. The decision is
copied into the saga's stream (`saga.step_reviewed`), from which its fold decides: approved runs
the action with the review's (possibly edited) input, rejected fails the step for good.

Two reviewers deciding at once read the same version and append expecting it: one decision is
stored, the other append conflicts, and its reviewer is told who decided (ReviewDecidedError).
A deadline rejects the review or escalates it to another group, as the request declares; any
process may apply it (`expire_if_due`), since the outcome is a function of the review's stream
and the time, and the write is fenced like the others.

Who a reviewer is depends on the store. When it checks who signed what it reads (a JetStream
store on a secured bus, `EventStore.verifies_signers`), an event counts only if the right
identity signed it (`RecordedEvent.signer`, `newfuse.nats.signing`): a claim, an edit or a
decision only when its signer is the reviewer it names (`by`) and their certificate names one
of the review's groups (`fuse auth add NAME --role reviewer --group ops`); a request, an
escalation or an expiry only when the bus itself signed it (an admin or a service, such as the
orchestrator). The fold ignores any other event and says why in `ignored` (`fuse review show`
prints it), so an approval forged with plain nats-py, or appended by one identity in another's
name, never runs a step: the saga waits on. There `claim`, `approve`, ... refuse, before
writing, a reviewer who is not the one the store signs as (ReviewerIdentityError), and
`signed_reviewer` is that one, from the credentials.

Elsewhere (SQLite, whose file's writer is its owner; a bus without credentials) a reviewer is
what they say (`Reviewer(name, groups)`, from `--as` / `--group` or $FUSE_REVIEWER /
$FUSE_REVIEWER_GROUPS), and the group check compares it with what the review declares.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from newfuse.errors import (
    ReviewClaimedError,
    ReviewDecidedError,
    ReviewerIdentityError,
    ReviewerNotAllowedError,
    ReviewInputError,
    ReviewNotFoundError,
    SagaDefinitionError,
    WrongExpectedVersionError,
)
from newfuse.eventstore import NO_STREAM, EventStore
from newfuse.schemas import (
    Certified,
    NewEvent,
    RecordedEvent,
    ReviewApproved,
    ReviewClaimed,
    ReviewEscalated,
    ReviewExpired,
    ReviewInputEdited,
    ReviewRejected,
    ReviewRequested,
    StepReviewed,
    check_token,
    utcnow,
)

if TYPE_CHECKING:
    from newfuse.core.saga import StepContext

CATEGORY = "review"
CONFLICT_RETRIES = 20
"""Appends one operation retries after losing a race for the stream (each a fresh read)."""
MAX_TEXT = 4096
"""Characters a summary or a comment keeps at most."""
MAX_NAME = 128
"""Characters of a reviewer's or a group's name at most."""
MAX_INPUT_BYTES = 64 * 1024
"""Bytes of an edited input (as JSON) at most."""

ReviewStatus = Literal["pending", "claimed", "approved", "rejected", "expired"]
STATUSES: tuple[ReviewStatus, ...] = ("pending", "claimed", "approved", "rejected", "expired")
BUS_ROLES: tuple[str, ...] = ("admin", "service")
"""Roles whose signature counts on a request, an escalation or an expiry: the bus's own
processes (the orchestrator opens reviews and applies their deadlines)."""


def _groups(group: str | Sequence[str], *, what: str) -> tuple[str, ...]:
    groups = (group,) if isinstance(group, str) else tuple(group)
    if not groups or not all(isinstance(g, str) and 0 < len(g) <= MAX_NAME for g in groups):
        raise SagaDefinitionError(
            saga="?", reason=f"{what} needs one or more group names of 1 to {MAX_NAME} characters"
        )
    return groups


@dataclass(frozen=True)
class Escalate:
    """What a review's deadline does when it passes undecided: hand it to `group`, who have
    `deadline` seconds more (default: as long as the first group had); then it is rejected."""

    group: str | Sequence[str]
    deadline: float | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        return _groups(self.group, what="Escalate")


@dataclass(frozen=True)
class Review:
    """A step's human review: someone of `group` approves (or rejects) it within `deadline`
    seconds; then `on_deadline` rejects it, or escalates it (`Escalate("leads")`).

    `summary` says what to review (a text, or a function of the step's context); `propose` the
    input proposed to the step (a function of its context; default the saga's input), which a
    reviewer may edit before approving.
    """

    group: str | Sequence[str]
    deadline: float = 3600.0
    on_deadline: Literal["reject"] | Escalate = "reject"
    summary: str | Callable[[StepContext], str] | None = None
    propose: Callable[[StepContext], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.groups  # noqa: B018 - checks the names now, at the definition
        if isinstance(self.on_deadline, Escalate):
            self.on_deadline.groups  # noqa: B018
        elif self.on_deadline != "reject":
            raise SagaDefinitionError(saga="?", reason='on_deadline is "reject" or Escalate(group)')
        escalation = self.on_deadline.deadline if isinstance(self.on_deadline, Escalate) else 1
        if self.deadline <= 0 or (escalation is not None and escalation <= 0):
            raise SagaDefinitionError(saga="?", reason="a review's deadlines are > 0 seconds")

    @property
    def groups(self) -> tuple[str, ...]:
        return _groups(self.group, what="Review")


@dataclass(frozen=True)
class Reviewer:
    """A person deciding reviews: a name and the groups they act for."""

    name: str
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (self.name, *self.groups):
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
                raise ReviewInputError(
                    what="reviewer",
                    reason=f"a name or group is 1 to {MAX_NAME} printable characters, not {name!r}",
                )


def review_id(saga_id: str, step: str) -> str:
    """The id of the review of `step` in saga `saga_id`: the same on every orchestrator and
    after every crash, so a re-driven saga opens it once."""
    digest = hashlib.sha256(f"{saga_id}/{step}".encode()).hexdigest()
    return f"rv{digest[:16]}"


def review_stream(review: str) -> str:
    """The stream of one review: `review.<id>`."""
    return f"{CATEGORY}.{check_token(review, kind='review id')}"


@dataclass
class ReviewState:
    """One review as the fold of its stream."""

    id: str
    saga_id: str = ""
    step: str = ""
    summary: str = ""
    action: str = ""
    proposed: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    """What the step runs with if approved: the proposed input, or the last edit."""
    groups: list[str] = field(default_factory=list)
    """Who may decide now (the escalation's groups, once escalated)."""
    deadline: datetime | None = None
    on_deadline: str = "reject"
    escalate_to: list[str] = field(default_factory=list)
    escalate_seconds: float = 0.0
    escalated: bool = False
    status: ReviewStatus = "pending"
    claimed_by: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    comment: str = ""
    requested_at: datetime | None = None
    version: int = 0
    history: list[str] = field(default_factory=list)
    """Who did what, when: one line per event (the audit, for `fuse review show`)."""
    ignored: list[str] = field(default_factory=list)
    """Events read and not applied (foreign, out of place, not signed by whom they must be),
    each with its position and why."""
    signed: bool = False
    """Whether events count only when the right identity signed them (the store checks
    signers; see the module docstring)."""

    @property
    def requested(self) -> bool:
        return bool(self.saga_id)

    @property
    def decided(self) -> bool:
        return self.status in ("approved", "rejected", "expired")

    @classmethod
    def fold(
        cls, review: str, events: Iterable[RecordedEvent], *, signed: bool = False
    ) -> ReviewState:
        """The state of `review` after `events`; `signed`: count only what the right identity
        signed (events read from a store that `verifies_signers`)."""
        state = cls(review, signed=signed)
        for event in events:
            state.apply(event)
        return state

    def apply(self, event: RecordedEvent) -> None:
        """Fold one event; one that does not fit is noted in `ignored`, never raised."""
        self.version = event.version
        data: Any = event.data
        where = f"position {event.position} ({event.type})"
        if getattr(data, "review_id", None) != self.id:
            self.ignored.append(f"{where}: not an event of review {self.id!r}")
            return
        if self.signed:
            refused = self._unsigned(data, event.signer)
            if refused is not None:
                self.ignored.append(f"{where}: {refused}")
                return
        if isinstance(data, ReviewRequested):
            if self.requested:
                self.ignored.append(f"{where}: the review was requested already")
                return
            self._request(data)
            return
        if not self.requested or self.decided:
            self.ignored.append(f"{where}: the review is {'decided' if self.decided else 'new'}")
            return
        when = data.timestamp.isoformat(timespec="seconds")
        if isinstance(data, ReviewClaimed):
            self.status, self.claimed_by = "claimed", data.by
            self.history.append(f"{when} claimed by {data.by}")
        elif isinstance(data, ReviewInputEdited):
            self.input = data.input
            self.history.append(f"{when} input edited by {data.by}")
        elif isinstance(data, ReviewApproved | ReviewRejected):
            approved = isinstance(data, ReviewApproved)
            self.status = "approved" if approved else "rejected"
            self.decided_by, self.decided_at, self.comment = data.by, data.timestamp, data.comment
            said = f": {data.comment}" if data.comment else ""
            self.history.append(f"{when} {self.status} by {data.by}{said}")
        elif isinstance(data, ReviewEscalated):
            self.groups, self.deadline, self.escalated = list(data.groups), data.deadline, True
            self.status, self.claimed_by = "pending", None
            self.history.append(f"{when} escalated to {', '.join(data.groups)}")
        elif isinstance(data, ReviewExpired):
            self.status, self.decided_by, self.decided_at = "expired", "deadline", data.timestamp
            self.comment = f"no decision by {data.deadline.isoformat(timespec='seconds')}"
            self.history.append(f"{when} expired: rejected at its deadline")
        else:
            self.ignored.append(f"{where}: not a review event")

    def _unsigned(self, data: Any, signer: Certified | None) -> str | None:
        """Why `data` does not count as signed by `signer` (None: it counts)."""
        who = "unsigned" if signer is None else f"signed by {signer.name} ({signer.role})"
        if isinstance(data, ReviewRequested | ReviewEscalated | ReviewExpired):
            if signer is None or signer.role not in BUS_ROLES:
                return f"{who}, not by the bus (an admin or a service)"
            return None
        by = getattr(data, "by", None)
        if by is None:
            return None  # not a review event: apply says so
        if signer is None or signer.name != by:
            return f"{who}, not by {by}, whom it names"
        if self.requested and not set(signer.groups) & set(self.groups):
            held = ", ".join(signer.groups) or "no group"
            return f"{by}'s certificate names {held}, not {' or '.join(self.groups)}"
        return None

    def _request(self, data: ReviewRequested) -> None:
        self.saga_id, self.step, self.summary, self.action = (
            data.saga_id,
            data.step,
            data.summary,
            data.action,
        )
        self.proposed, self.input, self.groups = data.input, data.input, list(data.groups)
        self.deadline, self.on_deadline = data.deadline, data.on_deadline
        self.escalate_to, self.escalate_seconds = list(data.escalate_to), data.escalate_seconds
        self.requested_at = data.timestamp
        when = data.timestamp.isoformat(timespec="seconds")
        self.history.append(f"{when} requested from {', '.join(data.groups)}")

    def decision(self) -> StepReviewed | None:
        """The decision as the saga's stream keeps it (None while undecided)."""
        if not self.decided or self.decided_at is None:
            return None
        return StepReviewed(
            saga_id=self.saga_id,
            step=self.step,
            review_id=self.id,
            decision="approved" if self.status == "approved" else "rejected",
            by=self.decided_by or "",
            comment=self.comment,
            input=self.input,
            decided_at=self.decided_at,
        )


async def read_review(store: EventStore, review: str) -> ReviewState:
    """The fold of `review.<id>` (not `requested` when it has no request); on a store that
    checks signers, only what the right identities signed counts."""
    events = [e async for e in store.read(review_stream(review))]
    return ReviewState.fold(review, events, signed=store.verifies_signers)


def signed_reviewer(
    store: EventStore, name: str | None = None, groups: Sequence[str] | None = None
) -> Reviewer:
    """The reviewer `store` signs as (its credentials' certificate): their name and groups.
    `name` and `groups`, when given, must be theirs (`fuse review approve --as`), and
    `groups` narrows the ones they act for.

    Raises:
        ReviewerIdentityError: the store signs nothing, or as someone else, or `groups` names
            a group the certificate does not.
    """
    identity = store.identity
    if identity is None:
        raise ReviewerIdentityError(
            reviewer=name or "?",
            signed_as=None,
            reason="this connection signs nothing, and the bus counts only signed decisions "
            "(connect with your credentials: --credentials or $FUSE_NATS_CREDENTIALS)",
        )
    if name is not None and name != identity.name:
        raise ReviewerIdentityError(
            reviewer=name,
            signed_as=identity.name,
            reason=f"your credentials are {identity.name}'s (leave out --as, or use your own)",
        )
    chosen = tuple(groups) if groups else identity.groups
    foreign = [group for group in chosen if group not in identity.groups]
    if foreign:
        held = ", ".join(identity.groups) or "no group"
        raise ReviewerIdentityError(
            reviewer=identity.name,
            signed_as=identity.name,
            reason=f"the certificate names {held}, not {', '.join(foreign)} "
            "(`fuse auth add NAME --role reviewer --group G` issues one that does)",
        )
    return Reviewer(identity.name, chosen)


async def list_reviews(store: EventStore) -> AsyncIterator[ReviewState]:
    """Every review requested, folded, in the order the store lists their streams."""
    async for stream in store.streams(CATEGORY):
        state = await read_review(store, stream.partition(".")[2])
        if state.requested:
            yield state


def request_for(
    review: Review, *, saga_name: str, ctx: StepContext, now: datetime
) -> ReviewRequested:
    """The request that opens the review of `ctx.step` in saga `ctx.saga_id`."""
    proposed = review.propose(ctx) if review.propose is not None else ctx.input
    summary = review.summary(ctx) if callable(review.summary) else review.summary
    escalation = review.on_deadline if isinstance(review.on_deadline, Escalate) else None
    return ReviewRequested(
        review_id=review_id(ctx.saga_id, ctx.step),
        saga_id=ctx.saga_id,
        step=ctx.step,
        summary=(summary or f"approve step {ctx.step!r} of saga {saga_name!r}")[:MAX_TEXT],
        action=f"{saga_name}.{ctx.step}",
        input=_checked_input(msgspec.to_builtins(proposed), what="the proposed input"),
        groups=list(review.groups),
        deadline=now + timedelta(seconds=review.deadline),
        on_deadline="escalate" if escalation else "reject",
        escalate_to=list(escalation.groups) if escalation else [],
        escalate_seconds=(escalation.deadline or review.deadline) if escalation else 0.0,
    )


async def open_review(store: EventStore, request: ReviewRequested) -> ReviewState:
    """Append `request` unless the review exists (opening twice stores it once); its state."""
    try:
        await store.append(
            review_stream(request.review_id),
            NewEvent(data=request, correlation_id=request.saga_id),
            NO_STREAM,
        )
    except WrongExpectedVersionError:
        pass  # another orchestrator, or an earlier run, opened it
    return await read_review(store, request.review_id)


def _checked_input(value: Any, *, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReviewInputError(what=what, reason=f"a step's input is a JSON object, not {value!r}")
    size = len(msgspec.json.encode(value))
    if size > MAX_INPUT_BYTES:
        raise ReviewInputError(what=what, reason=f"{size} bytes, over {MAX_INPUT_BYTES}")
    return value


def _text(value: str, *, what: str) -> str:
    if len(value) > MAX_TEXT:
        raise ReviewInputError(what=what, reason=f"{len(value)} characters, over {MAX_TEXT}")
    return value


def _check(state: ReviewState, reviewer: Reviewer) -> None:
    """Raise unless `reviewer` may act on `state` now (on a signed store, `reviewer` is the
    one the store signs as: `_act` made sure)."""
    if not state.requested:
        raise ReviewNotFoundError(review_id=state.id)
    if state.decided:
        raise ReviewDecidedError(
            review_id=state.id,
            status=state.status,
            by=state.decided_by or "?",
            at=state.decided_at.isoformat(timespec="seconds") if state.decided_at else "?",
        )
    if not set(reviewer.groups) & set(state.groups):
        hint = "their certificate names the groups they act for" if state.signed else None
        raise ReviewerNotAllowedError(
            review_id=state.id,
            reviewer=reviewer.name,
            groups=list(reviewer.groups),
            allowed=state.groups,
            hint=hint,
        )
    if state.claimed_by not in (None, reviewer.name):
        raise ReviewClaimedError(review_id=state.id, by=state.claimed_by, wanted=reviewer.name)


async def _act(
    store: EventStore,
    review: str,
    reviewer: Reviewer,
    make: Callable[[ReviewState], Any | None],
) -> ReviewState:
    """Read, check, and append `make(state)` expecting the version read (None: nothing to do);
    a lost race reads again, so the loser learns who decided. The state after. On a store
    that checks signers, `reviewer` must be who it signs as (else nothing would count)."""
    if store.verifies_signers:
        reviewer = signed_reviewer(store, reviewer.name, reviewer.groups)
    for _ in range(CONFLICT_RETRIES):
        state = await read_review(store, review)
        _check(state, reviewer)
        event = make(state)
        if event is None:
            return state
        if await _write(store, state, event):
            return await read_review(store, review)
    return await read_review(store, review)


async def _write(store: EventStore, state: ReviewState, event: Any) -> bool:
    """Append `event` expecting the version `state` was read at; False when another write came
    first (nothing stored)."""
    try:
        await store.append(
            review_stream(state.id),
            NewEvent(data=event, correlation_id=state.saga_id),
            state.version,
        )
    except WrongExpectedVersionError:
        return False
    return True


async def claim(store: EventStore, review: str, reviewer: Reviewer) -> ReviewState:
    """`reviewer` takes the review: from now only they may edit or decide it (claiming again
    is a no-op).

    Raises:
        ReviewNotFoundError, ReviewDecidedError, ReviewClaimedError, ReviewerNotAllowedError.
    """

    def make(state: ReviewState) -> ReviewClaimed | None:
        if state.claimed_by == reviewer.name:
            return None
        return ReviewClaimed(review_id=review, saga_id=state.saga_id, by=reviewer.name)

    return await _act(store, review, reviewer, make)


async def edit(
    store: EventStore, review: str, reviewer: Reviewer, input: dict[str, Any]
) -> ReviewState:
    """Replace the input the step will run with when approved."""
    checked = _checked_input(input, what="the edited input")
    return await _act(
        store,
        review,
        reviewer,
        lambda state: ReviewInputEdited(
            review_id=review, saga_id=state.saga_id, by=reviewer.name, input=checked
        ),
    )


async def approve(
    store: EventStore, review: str, reviewer: Reviewer, comment: str = ""
) -> ReviewState:
    """Approve: the step runs with the review's input. Of two decisions at once one is stored;
    the other raises ReviewDecidedError naming who decided."""
    text = _text(comment, what="the comment")
    return await _act(
        store,
        review,
        reviewer,
        lambda state: ReviewApproved(
            review_id=review, saga_id=state.saga_id, by=reviewer.name, comment=text
        ),
    )


async def reject(store: EventStore, review: str, reviewer: Reviewer, comment: str) -> ReviewState:
    """Reject (`comment` says why, and is required): the step fails for good, the saga
    compensates."""
    text = _text(comment, what="the comment")
    if not text.strip():
        raise ReviewInputError(what="the comment", reason="a rejection says why")
    return await _act(
        store,
        review,
        reviewer,
        lambda state: ReviewRejected(
            review_id=review, saga_id=state.saga_id, by=reviewer.name, comment=text
        ),
    )


async def expire_if_due(store: EventStore, review: str, now: datetime | None = None) -> ReviewState:
    """Apply the review's deadline when it has passed undecided: escalate it (once, when the
    request says so) or reject it (`review.expired`); the state after. What the orchestrator
    calls when the deadline is due (and a scheduled timer message, once timers exist);
    any number of processes may call it: the write is fenced."""
    for _ in range(CONFLICT_RETRIES):
        state = await read_review(store, review)
        moment = now or utcnow()
        if not state.requested or state.decided or state.deadline is None:
            return state
        if state.deadline > moment:
            return state
        event: ReviewEscalated | ReviewExpired
        if state.on_deadline == "escalate" and not state.escalated and state.escalate_to:
            event = ReviewEscalated(
                review_id=review,
                saga_id=state.saga_id,
                groups=state.escalate_to,
                deadline=moment + timedelta(seconds=state.escalate_seconds),
            )
        else:
            event = ReviewExpired(review_id=review, saga_id=state.saga_id, deadline=state.deadline)
        if await _write(store, state, event):
            break
    return await read_review(store, review)
