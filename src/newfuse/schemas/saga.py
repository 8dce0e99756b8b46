"""Saga events: a saga's stream (`saga.<id>`) is its whole history, and its state their fold.

A step runs in two phases, its action and, when a later step fails, its compensation. Each
attempt of either is claimed by a `saga.step_started` (appended with the stream's expected
version, so one orchestrator wins it) that holds a lease until `leaseUntil`; the attempt's
outcome, `saga.step_completed` or `saga.step_failed`, is appended expecting the claim's version
(or, when other steps of its parallel group wrote since, the version of a read in which the
step's latest claim is still the writer's), so an orchestrator whose lease was taken over (it
paused, its clock ran on) cannot write it.

The outcome that ends a saga is not an event of its own: it is carried inside the end
(`saga.committed` or `saga.rolled_back`, field `completed` or `failed`), so the last outcome and
the end are one write, atomic without a batch. A reader that folds step outcomes looks there too.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow

Phase = Literal["action", "compensation"]


class SagaStarted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.started`: a saga of definition `name` began with `input`; `steps` names its
    steps in order (what the orchestrator will run); `groups` maps each step of a parallel
    group to the group's name (the steps of one group run concurrently)."""

    saga_id: str = msgspec.field(name="sagaId")
    name: str
    input: dict[str, Any] = {}
    steps: list[str] = []
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)
    groups: dict[str, str] = {}


class StepStarted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.step_started`: `driver` claimed attempt `attempt` of a step's `phase`, and
    holds it until `leaseUntil` (then another orchestrator may take it over)."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    phase: Phase = "action"
    attempt: int
    driver: str
    lease_until: Timestamp = msgspec.field(name="leaseUntil")
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class StepCompleted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.step_completed`: the attempt succeeded; `output` feeds later steps."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    phase: Phase = "action"
    attempt: int
    output: Any = None
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class StepFailed(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.step_failed`: the attempt failed with `error` (`retryable`: another attempt
    may succeed, if the step has attempts left). `released`: it did not fail, its orchestrator
    stopped and gave the claim back (the attempt may have run: it is claimed again at once,
    and spends no attempt)."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    phase: Phase = "action"
    attempt: int
    error: str
    retryable: bool = True
    released: bool = False
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class SagaCommitted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.committed`: every step's action succeeded. `completed` is the last step's
    outcome, stored inside the commit so both are one write (absent when the commit came
    later, on its own)."""

    saga_id: str = msgspec.field(name="sagaId")
    completed: StepCompleted | None = None
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class SagaRolledBack(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.rolled_back`: step `failed_step` failed for good (`error`) and every step
    completed before it was compensated. The outcome that ended it rides inside: the last
    compensation's (`completed`) or, when nothing needed undoing, the failure (`failed`)."""

    saga_id: str = msgspec.field(name="sagaId")
    failed_step: str = msgspec.field(name="failedStep")
    error: str
    completed: StepCompleted | None = None
    failed: StepFailed | None = None
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class SagaStuck(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.stuck`: the compensation of `step` kept failing (`error`); the saga waits for
    a person (nothing more runs on its own)."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    error: str
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class SagaLockWaiting(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.lock_waiting`: step `step` waits for the lock on `resource` (its request is on
    the stream `lock.<resource>`); the saga stays here until `saga.lock_acquired`, or an
    abort or the step's lock-wait timeout fails the step."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    resource: str
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class SagaLockAcquired(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.lock_acquired`: the saga holds `resource` (grant `token`, its fencing token)
    until it ends."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    resource: str
    token: int
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class SagaAborted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.aborted`: a deadlock detector (`detector`) chose this saga as the victim of
    the wait-for cycle `cycle` (saga ids) while step `step` waited: the step fails for good, the
    saga compensates and releases its locks. Appended expecting the version at which the saga
    waited, so it lands only while it still waits, and only once."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    reason: str
    cycle: list[str] = []
    detector: str = ""
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class StepReviewed(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.step_reviewed`: review `reviewId` of step `step` was decided (`approved` or
    `rejected`, by `by`, with `comment`), copied here so the saga's fold decides from its own
    stream: approved runs the step with `input`, rejected fails it for good. Appended expecting
    the saga's version (fenced, like every saga write)."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    review_id: str = msgspec.field(name="reviewId")
    decision: Literal["approved", "rejected"]
    by: str
    comment: str = ""
    input: dict[str, Any] = {}
    decided_at: Timestamp = msgspec.field(name="decidedAt")
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class SagaResolved(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `saga.resolved`: a person (`by`) resolved the stuck compensation of `step`:
    `rolled_back` (it was undone by hand: the saga is rolled back) or `retry` (the compensation
    gets fresh attempts). Appended expecting the version at which the saga was stuck."""

    saga_id: str = msgspec.field(name="sagaId")
    step: str
    resolution: Literal["rolled_back", "retry"]
    by: str
    comment: str = ""
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


SAGA_TYPES: Final[dict[str, type[msgspec.Struct]]] = {
    "saga.started": SagaStarted,
    "saga.step_started": StepStarted,
    "saga.step_completed": StepCompleted,
    "saga.step_failed": StepFailed,
    "saga.committed": SagaCommitted,
    "saga.rolled_back": SagaRolledBack,
    "saga.stuck": SagaStuck,
    "saga.lock_waiting": SagaLockWaiting,
    "saga.lock_acquired": SagaLockAcquired,
    "saga.aborted": SagaAborted,
    "saga.step_reviewed": StepReviewed,
    "saga.resolved": SagaResolved,
}
"""The saga event types and their payloads (version 1 each)."""
