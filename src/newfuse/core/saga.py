"""Sagas: definitions, the fold of a saga's stream into its state, and what to do next.

A `Saga` is an ordered list of steps; each has an action, an optional compensation, a timeout
and a number of attempts. Consecutive steps declared with the same `group` form a parallel
group: they run concurrently, and the steps after the group start once all of them are done
(and see all their outputs). Everything that happens to one saga is an event on its stream
`saga.<id>` (schemas/saga.py), and its state is their fold (`SagaState.fold`). What the
orchestrator does next is a pure function of the definition, the state and the time
(`moves`: every move that can be made now), so every orchestrator instance, after any crash,
decides the same from the log.

A group whose step fails for good lets its other running steps finish (or time out), starts
none of its steps that had not started, and then every completed step of the saga is
compensated: the groups newest first, the steps of one group concurrently.

Effects run at least once: an action whose orchestrator died after it ran, and before its
outcome was stored, runs again. Each attempt gets the same `StepContext.idempotency_key`
(`<saga id>/<step>` for the action, `<saga id>/<step>/undo` for the compensation), so an
effect keyed by it (a conditional write, a request with that id) happens once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from newfuse.errors import SagaDefinitionError
from newfuse.schemas import (
    Phase,
    RecordedEvent,
    SagaAborted,
    SagaCommitted,
    SagaLockAcquired,
    SagaLockWaiting,
    SagaResolved,
    SagaRolledBack,
    SagaStarted,
    SagaStuck,
    StepCompleted,
    StepFailed,
    StepReviewed,
    StepStarted,
    Transaction,
    TransactionStatus,
    check_token,
    utcnow,
)

if TYPE_CHECKING:
    from newfuse.core.review import Review

SagaStatus = Literal["active", "compensating", "committed", "rolled_back", "stuck"]
StepStatus = Literal[
    "pending", "waiting", "running", "done", "failed", "compensating", "compensated", "stuck"
]


@dataclass(frozen=True)
class StepContext:
    """What a step's action or compensation sees."""

    saga_id: str
    step: str
    phase: Phase
    attempt: int
    input: dict[str, Any]
    """The saga's input."""
    outputs: dict[str, Any]
    """The outputs of the steps completed so far, by step name."""
    locks: dict[str, int] = field(default_factory=dict)
    """The locks the saga holds -> each grant's fencing token (carry it in writes elsewhere:
    a store that keeps the highest token seen per resource refuses a stale holder's)."""
    review: StepReviewed | None = None
    """The approved review of this step (who, comment; `input` is then the reviewed input),
    None when the step has no review."""

    @property
    def idempotency_key(self) -> str:
        """The same on every attempt of this step's phase: key effects by it."""
        if self.phase == "action":
            return f"{self.saga_id}/{self.step}"
        return f"{self.saga_id}/{self.step}/undo"


Action = Callable[[StepContext], Awaitable[Any]]


@dataclass
class Step:
    """One step of a saga: its action, its compensation (None: nothing to undo)."""

    name: str
    action: Action
    compensation: Action | None = None
    timeout: float = 30.0
    attempts: int = 3
    backoff: float = 0.2
    """Seconds before the second attempt, doubling per attempt (at most 30 s)."""
    compensation_attempts: int = 5
    locks: tuple[str, ...] = ()
    """Resources the step locks (in this order) before its action; held until the saga ends."""
    lock_timeout: float = 30.0
    """Seconds the step waits for one lock before it fails for good (the saga rolls back)."""
    review: Review | None = None
    """A person approves the step before its action runs (core/review.py)."""
    group: str | None = None
    """The parallel group the step belongs to (None: it runs alone)."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt` (1: none)."""
        return 0.0 if attempt <= 1 else min(30.0, self.backoff * 2 ** (attempt - 2))

    def tries(self, phase: Phase) -> int:
        return self.attempts if phase == "action" else self.compensation_attempts


class Saga:
    """A saga definition: ordered steps, each an action and its compensation.

    Example:
        >>> order = Saga("order")
        >>> @order.step("reserve", timeout=5, attempts=3)
        ... async def reserve(ctx: StepContext) -> dict[str, str]:
        ...     return {"reservation": ctx.idempotency_key}
        >>> @order.compensate("reserve")
        ... async def release(ctx: StepContext) -> None: ...
        >>> @order.step("charge", group="pay")  # charge and notify run concurrently
        ... async def charge(ctx: StepContext) -> None: ...
        >>> @order.step("notify", group="pay")
        ... async def notify(ctx: StepContext) -> None: ...
    """

    def __init__(self, name: str) -> None:
        self.name = check_token(name, kind="saga name")
        self.steps: list[Step] = []

    def step(
        self,
        name: str,
        *,
        timeout: float = 30.0,
        attempts: int = 3,
        backoff: float = 0.2,
        locks: Sequence[str] = (),
        lock_timeout: float = 30.0,
        review: Review | None = None,
        group: str | None = None,
    ) -> Callable[[Action], Action]:
        """Decorator: the next step of the saga, run by `async def f(ctx)`; its return value
        (JSON-encodable) is the step's output. `locks`: resources acquired, in the order given,
        before the action (each waited for at most `lock_timeout` seconds), held until the
        saga commits or rolls back. `review`: someone approves the step (and may edit its
        input) before it runs; rejected, it fails for good (core/review.py). `group`:
        consecutive steps of one group run concurrently (a group is declared in one run of
        steps: its name cannot come back later)."""
        check_token(name, kind="step name")
        if group is not None:
            check_token(group, kind="step group")
            last = self.steps[-1].group if self.steps else None
            if last != group and any(step.group == group for step in self.steps):
                raise SagaDefinitionError(
                    saga=self.name,
                    reason=f"step {name!r}: group {group!r} was declared earlier, not just "
                    "before it (the steps of a group are consecutive)",
                )
        for resource in locks:
            check_token(resource, kind="lock resource")
        if len(set(locks)) != len(locks) or lock_timeout <= 0:
            raise SagaDefinitionError(
                saga=self.name, reason=f"step {name!r} needs distinct locks and lock_timeout > 0"
            )
        if any(step.name == name for step in self.steps):
            raise SagaDefinitionError(saga=self.name, reason=f"step {name!r} is defined twice")
        if timeout <= 0 or attempts < 1:
            raise SagaDefinitionError(
                saga=self.name, reason=f"step {name!r} needs timeout > 0 and attempts >= 1"
            )

        def decorate(fn: Action) -> Action:
            self.steps.append(
                Step(
                    name,
                    fn,
                    timeout=timeout,
                    attempts=attempts,
                    backoff=backoff,
                    locks=tuple(locks),
                    lock_timeout=lock_timeout,
                    review=review,
                    group=group,
                )
            )
            return fn

        return decorate

    def compensate(self, name: str, *, attempts: int = 5) -> Callable[[Action], Action]:
        """Decorator: `async def f(ctx)` undoes step `name` (when a later step fails)."""

        def decorate(fn: Action) -> Action:
            step = self.get(name)
            if step.compensation is not None:
                raise SagaDefinitionError(
                    saga=self.name, reason=f"step {name!r} has a compensation already"
                )
            step.compensation = fn
            step.compensation_attempts = attempts
            return fn

        return decorate

    @property
    def stages(self) -> list[list[Step]]:
        """The steps in the order they run: each stage a parallel group, or one step alone."""
        stages: list[list[Step]] = []
        for step in self.steps:
            if stages and step.group is not None and stages[-1][0].group == step.group:
                stages[-1].append(step)
            else:
                stages.append([step])
        return stages

    @property
    def groups(self) -> dict[str, str]:
        """Step name -> its group's name, for the steps that are in a group."""
        return {step.name: step.group for step in self.steps if step.group is not None}

    def get(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        known = ", ".join(step.name for step in self.steps) or "none"
        raise SagaDefinitionError(saga=self.name, reason=f"no step {name!r} (it has {known})")


@dataclass
class StepState:
    """One step of one saga as its events left it."""

    name: str
    status: StepStatus = "pending"
    attempts: int = 0
    """Attempts of the current phase claimed so far."""
    phase: Phase = "action"
    driver: str | None = None
    lease_until: datetime | None = None
    output: Any = None
    error: str | None = None
    retryable: bool = True
    started_at: datetime | None = None
    ended_at: datetime | None = None
    history: list[str] = field(default_factory=list)
    """What happened, one line per event (for `fuse sagas show`)."""
    reviewed: StepReviewed | None = None
    """The decision of the step's review (None: none yet, or the step has no review)."""
    group: str | None = None
    """The parallel group of the step, as `saga.started` declared it."""


@dataclass(frozen=True)
class LockWait:
    """A step waiting for a lock: which resource, since when."""

    step: str
    resource: str
    since: datetime


@dataclass
class SagaState:
    """A saga as the fold of its stream."""

    id: str
    name: str = ""
    input: dict[str, Any] = field(default_factory=dict)
    status: SagaStatus = "active"
    steps: dict[str, StepState] = field(default_factory=dict)
    version: int = 0
    """The stream's version after the last event folded (what the next append expects)."""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    failed_step: str | None = None
    error: str | None = None
    ignored: list[str] = field(default_factory=list)
    """Events read and not applied (foreign, out of order), each with its position and why."""
    locks: dict[str, int] = field(default_factory=dict)
    """Resources the saga holds -> the grant's fencing token."""
    lock_wait: LockWait | None = None
    """The lock a step waits for now."""
    requested: list[str] = field(default_factory=list)
    """Every resource the saga waited for (released, held or asked, when it ends)."""
    aborted: str | None = None
    """Why a deadlock detector aborted the saga (None: it did not)."""
    resolutions: list[SagaResolved] = field(default_factory=list)
    """How people resolved the saga when it was stuck, oldest first."""

    @property
    def ended(self) -> bool:
        return self.status in ("committed", "rolled_back", "stuck")

    @property
    def settled(self) -> bool:
        """Committed or rolled back: nothing of it runs again (a stuck saga may be retried)."""
        return self.status in ("committed", "rolled_back")

    def copy(self) -> SagaState:
        """A copy that folding more events into leaves this one as it was: what a fold
        changes in place (the steps, the lists, the locks) is copied, what it only replaces
        (the input, outputs, timestamps, decisions) is shared. A deep copy's result at a
        tenth of its cost, for the orchestrator's look-ahead folds."""
        return dataclasses.replace(
            self,
            steps={
                name: dataclasses.replace(step, history=list(step.history))
                for name, step in self.steps.items()
            },
            ignored=list(self.ignored),
            locks=dict(self.locks),
            requested=list(self.requested),
            resolutions=list(self.resolutions),
        )

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: s.output for name, s in self.steps.items() if s.status == "done"}

    def step_input(self, step: str) -> dict[str, Any]:
        """What `step` runs with: its approved review's input, else the saga's input."""
        reviewed = self.steps[step].reviewed if step in self.steps else None
        return reviewed.input if reviewed is not None else self.input

    @classmethod
    def fold(cls, saga_id: str, events: Iterable[RecordedEvent]) -> SagaState:
        """The state `events` (a saga stream's, in version order) make."""
        state = cls(saga_id)
        for event in events:
            state.apply(event)
        return state

    def apply(self, event: RecordedEvent) -> None:
        """Fold one event; one that does not fit is noted in `ignored`, never raised."""
        self.version = event.version
        self.apply_data(event.data, f"position {event.position} ({event.type})")

    def apply_data(self, data: Any, where: str) -> None:
        """Fold one event's payload (`where` names it in `ignored`)."""
        if getattr(data, "saga_id", self.id) != self.id:
            self.ignored.append(f"{where}: it names saga {data.saga_id!r}")
            return
        if isinstance(data, SagaStarted):
            if self.name:
                self.ignored.append(f"{where}: the saga started already")
                return
            self.name, self.input, self.started_at = data.name, data.input, data.timestamp
            self.steps = {name: StepState(name, group=data.groups.get(name)) for name in data.steps}
            return
        if not self.name:
            self.ignored.append(f"{where}: before saga.started")
            return
        if isinstance(data, SagaCommitted | SagaRolledBack | SagaStuck):
            for outcome in step_outcomes(data):  # the outcome that ended it rides inside
                self.apply_data(outcome, f"{where}, its last outcome")
            self._end(data)
            return
        if isinstance(data, SagaResolved):
            self._resolve(data, where)
            return
        if not isinstance(
            data,
            StepStarted
            | StepCompleted
            | StepFailed
            | SagaLockWaiting
            | SagaLockAcquired
            | SagaAborted
            | StepReviewed,
        ):
            self.ignored.append(f"{where}: not a saga event")
            return
        step = self.steps.get(data.step)
        if step is None:
            self.ignored.append(f"{where}: no step {data.step!r} in this saga")
            return
        if isinstance(data, SagaLockWaiting | SagaLockAcquired | SagaAborted):
            self._lock(step, data, where)
            return
        if isinstance(data, StepReviewed):
            self._reviewed(step, data, where)
            return
        self._step(step, data)

    def _reviewed(self, step: StepState, data: StepReviewed, where: str) -> None:
        """A review's decision: approved lets the step run (with its input), rejected fails it
        for good (the saga compensates)."""
        if self.status != "active" or step.status != "pending" or step.reviewed is not None:
            self.ignored.append(f"{where}: step {step.name!r} is not waiting for its review")
            return
        step.reviewed = data
        said = f": {data.comment}" if data.comment else ""
        step.history.append(f"review {data.review_id} {data.decision} by {data.by}{said}")
        if data.decision == "rejected":
            step.status, step.retryable, step.ended_at = "failed", False, data.timestamp
            step.error = f"review {data.review_id} rejected by {data.by}{said}"
            self.failed_step, self.error = step.name, step.error

    def _resolve(self, data: SagaResolved, where: str) -> None:
        """A person resolved the stuck compensation: undone by hand (rolled back), or retried
        with fresh attempts."""
        step = self.steps.get(data.step)
        if self.status != "stuck" or step is None or step.status != "stuck":
            self.ignored.append(f"{where}: the saga is {self.status}, its step is not stuck")
            return
        self.resolutions.append(data)
        step.history.append(f"resolved by {data.by} ({data.resolution}): {data.comment}")
        if data.resolution == "rolled_back":
            self.status, self.ended_at = "rolled_back", data.timestamp
            step.status, step.ended_at = "compensated", data.timestamp
            return
        self.status, self.ended_at = "compensating", None
        step.status, step.attempts, step.retryable, step.ended_at = "failed", 0, True, None

    def _lock(
        self, step: StepState, data: SagaLockWaiting | SagaLockAcquired | SagaAborted, where: str
    ) -> None:
        if self.status != "active" or step.status not in ("pending", "waiting"):
            self.ignored.append(f"{where}: step {step.name!r} is {step.status}, not before its run")
            return
        if isinstance(data, SagaLockWaiting):
            step.status = "waiting"
            self.lock_wait = LockWait(step.name, data.resource, data.timestamp)
            if data.resource not in self.requested:
                self.requested.append(data.resource)
            step.history.append(f"waits for lock {data.resource}")
        elif isinstance(data, SagaLockAcquired):
            step.status = "pending"
            self.lock_wait = None
            self.locks[data.resource] = data.token
            step.history.append(f"holds lock {data.resource} (token {data.token})")
        else:
            step.status, step.retryable, step.error = "failed", False, data.reason
            step.ended_at = data.timestamp
            self.lock_wait, self.aborted = None, data.reason
            self.failed_step, self.error = step.name, data.reason
            step.history.append(f"aborted: {data.reason}")

    def _end(self, data: SagaCommitted | SagaRolledBack | SagaStuck) -> None:
        self.ended_at = data.timestamp
        if isinstance(data, SagaCommitted):
            self.status = "committed"
        elif isinstance(data, SagaRolledBack):
            self.status, self.failed_step, self.error = "rolled_back", data.failed_step, data.error
        else:
            self.status, self.error = "stuck", data.error
            self.steps[data.step].status = "stuck" if data.step in self.steps else "failed"

    def _step(self, step: StepState, data: StepStarted | StepCompleted | StepFailed) -> None:
        if data.phase != step.phase:  # the compensation begins: attempts count afresh
            step.phase, step.attempts = data.phase, 0
        if isinstance(data, StepStarted):
            step.status = "running" if data.phase == "action" else "compensating"
            step.attempts = max(step.attempts, data.attempt)
            step.driver, step.lease_until = data.driver, data.lease_until
            step.started_at = step.started_at or data.timestamp
            step.history.append(f"{data.phase} attempt {data.attempt} claimed by {data.driver}")
        elif isinstance(data, StepCompleted):
            step.status = "done" if data.phase == "action" else "compensated"
            if data.phase == "action":
                step.output = data.output
            step.lease_until, step.ended_at = None, data.timestamp
            step.history.append(f"{data.phase} attempt {data.attempt} completed")
        elif data.released:  # given back unfinished: claimable again, no attempt spent
            step.status = "running" if data.phase == "action" else "compensating"
            step.attempts = data.attempt - 1
            step.lease_until = data.timestamp
            step.history.append(f"{data.phase} attempt {data.attempt} released: {data.error}")
            return
        else:
            if self.lock_wait is not None and self.lock_wait.step == step.name:
                self.lock_wait = None  # the lock-wait timeout
            step.status = "failed"
            step.error, step.retryable, step.lease_until = data.error, data.retryable, None
            step.ended_at = data.timestamp
            step.history.append(f"{data.phase} attempt {data.attempt} failed: {data.error}")
        if data.phase == "compensation" and self.status == "active":
            self.status = "compensating"
        if isinstance(data, StepFailed) and data.phase == "action":
            self.failed_step, self.error = step.name, data.error

    def transaction(self) -> Transaction:
        """The seed's `Transaction {id, operations, status, timestamp}` view of this saga."""
        status: TransactionStatus = "active"
        if self.status == "committed" or self.status == "rolled_back":
            status = self.status
        operations = [
            {
                "step": s.name,
                "status": s.status,
                "attempts": s.attempts,
                **({"group": s.group} if s.group else {}),
                **({"error": s.error} if s.error else {}),
            }
            for s in self.steps.values()
        ]
        return Transaction(
            id=self.id,
            operations=operations,
            status=status,
            timestamp=self.ended_at or self.started_at or utcnow(),
        )


def step_outcomes(data: Any) -> tuple[StepCompleted | StepFailed, ...]:
    """The step outcomes one event of a saga stream holds: an outcome itself, the one stored
    inside a saga's end (`completed` or `failed`), or none."""
    if isinstance(data, StepCompleted | StepFailed):
        return (data,)
    if isinstance(data, SagaCommitted | SagaRolledBack):
        failed = data.failed if isinstance(data, SagaRolledBack) else None
        return tuple(outcome for outcome in (data.completed, failed) if outcome is not None)
    return ()


class Run(msgspec.Struct, frozen=True):
    """Claim attempt `attempt` of `step`'s `phase` and run it."""

    step: str
    phase: Phase
    attempt: int


class Wait(msgspec.Struct, frozen=True):
    """Look again at `until` (or at the saga's next event): another orchestrator holds `step`
    until then, or its retry's backoff ends then."""

    step: str
    until: datetime


class Acquire(msgspec.Struct, frozen=True):
    """Acquire the lock on `resource` for `step` (wait for it), before its action runs."""

    step: str
    resource: str


class AwaitReview(msgspec.Struct, frozen=True):
    """Open `step`'s review (once) and wait for its decision before anything else of it."""

    step: str


class End(msgspec.Struct, frozen=True):
    """Append the saga's end: committed, rolled back, or stuck (a compensation kept failing)."""

    status: SagaStatus
    step: str = ""
    error: str = ""


Move = Run | Wait | Acquire | AwaitReview | End | None


def moves(saga: Saga, state: SagaState, now: datetime) -> list[Move]:
    """Every move that can be made now with `state`, a saga of definition `saga`, at time
    `now` (none once it has ended): the runs of a parallel group's steps together, at most one
    lock acquisition (a saga waits for one lock at a time), waits for claims others hold."""
    if state.ended or not state.name:
        return []
    if state.status == "active":
        forward = _forward(saga, state, now)
        if forward is not None:
            return forward
    return _backward(saga, state, now)


def next_move(saga: Saga, state: SagaState, now: datetime) -> Move:
    """The first of `moves` (None: nothing, it has ended): all there is to do for a saga
    without parallel groups."""
    found = moves(saga, state, now)
    return found[0] if found else None


def _forward(saga: Saga, state: SagaState, now: datetime) -> list[Move] | None:
    """The moves of the first stage not done (End when every one is); None when it failed
    for good and nothing of it runs any more: the saga compensates."""
    for stage in saga.stages:
        steps = [(d, state.steps[d.name]) for d in stage if d.name in state.steps]
        if all(step.status == "done" for _, step in steps):
            continue
        failed = any(
            step.status == "failed" and _attempt(d, step, "action", now) is None
            for d, step in steps
        )
        found: list[Move] = []
        for definition, step in steps:
            if step.status == "done":
                continue
            if failed:
                # the group failed: what runs is let finish (a claim whose driver died is
                # claimed again, to learn whether its effect happened); nothing else starts
                if step.status == "running":
                    found.append(_attempt(definition, step, "action", now))
                continue
            if definition.review is not None and step.reviewed is None and step.status == "pending":
                found.append(AwaitReview(step.name))  # a person decides; the others run on
                continue
            missing = [r for r in definition.locks if r not in state.locks]
            if missing and step.status in ("pending", "waiting"):
                if not any(isinstance(move, Acquire) for move in found):
                    found.append(Acquire(step.name, missing[0]))
                continue
            found.append(_attempt(definition, step, "action", now))
        return found or None
    return [End("committed")]


def _attempt(definition: Step, step: StepState, phase: Phase, now: datetime) -> Run | Wait | None:
    """The next attempt of `phase` (or a wait for its holder); None when it has none left."""
    if step.status in ("running", "compensating") and step.lease_until is not None:
        if step.lease_until > now:
            return Wait(step.name, step.lease_until)
        # its holder's lease ran out (it died, or paused): the claim it held is void
    # Only failures spend attempts: a claim whose holder died (its lease ran out with no
    # outcome) says nothing about the step, so it is claimed again.
    if step.status == "failed" and (not step.retryable or step.attempts >= definition.tries(phase)):
        return None
    attempt = step.attempts + 1
    if step.status == "failed" and step.ended_at is not None:  # a retry waits its backoff
        due = step.ended_at + timedelta(seconds=definition.delay(attempt))
        if due > now:
            return Wait(step.name, due)
    return Run(step.name, phase, attempt)


def _backward(saga: Saga, state: SagaState, now: datetime) -> list[Move]:
    """Compensate the completed steps, the newest stage first and the steps of one stage
    together; End when none is left (stuck when a compensation kept failing)."""
    for stage in reversed(saga.stages):
        found: list[Move] = []
        spent: StepState | None = None
        for definition in stage:
            step = state.steps.get(definition.name)
            if step is None or step.status == "compensated" or definition.compensation is None:
                continue
            if step.phase != "compensation":
                if step.status == "done":
                    found.append(Run(step.name, "compensation", 1))
                continue
            if step.status == "stuck":
                return []
            move = _attempt(definition, step, "compensation", now)
            if move is None:
                spent = spent or step
            else:
                found.append(move)
        if found:  # a spent compensation waits for its group's others to finish
            return found
        if spent is not None:
            return [End("stuck", spent.name, spent.error or "its compensation kept failing")]
    return [End("rolled_back", state.failed_step or "", state.error or "")]
