"""Transactions across agents: sagas (definitions, the fold of their streams, the orchestrator),
named resource locks and deadlock detection between sagas, human review of steps, resolving a
stuck saga, feedback on agents' results, and timers (scheduled wake-ups)."""

from newfuse.core.deadlock import DeadlockDetector, Detection
from newfuse.core.feedback import give_feedback, read_feedback
from newfuse.core.locks import LockState, read_lock
from newfuse.core.orchestrator import Orchestrator, read_saga, saga_stream, start_saga
from newfuse.core.resolution import resolve_saga
from newfuse.core.review import (
    Escalate,
    Review,
    Reviewer,
    ReviewState,
    list_reviews,
    read_review,
    review_id,
    signed_reviewer,
)
from newfuse.core.saga import (
    Saga,
    SagaState,
    Step,
    StepContext,
    StepState,
    moves,
    next_move,
    step_outcomes,
)
from newfuse.core.steps import ask, enqueue
from newfuse.core.timers import Fire, JetStreamTimers, MemoryTimers, Timers, open_timers

__all__ = [
    "DeadlockDetector",
    "Detection",
    "Escalate",
    "Fire",
    "JetStreamTimers",
    "LockState",
    "MemoryTimers",
    "Orchestrator",
    "Review",
    "ReviewState",
    "Reviewer",
    "Saga",
    "SagaState",
    "Step",
    "StepContext",
    "StepState",
    "Timers",
    "ask",
    "enqueue",
    "give_feedback",
    "list_reviews",
    "moves",
    "next_move",
    "open_timers",
    "read_feedback",
    "read_lock",
    "read_review",
    "read_saga",
    "resolve_saga",
    "review_id",
    "saga_stream",
    "signed_reviewer",
    "start_saga",
    "step_outcomes",
]
