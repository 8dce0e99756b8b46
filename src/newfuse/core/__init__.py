"""Transactions across agents: sagas (definitions, the fold of their streams, the orchestrator),
named resource locks and deadlock detection between sagas."""

from newfuse.core.deadlock import DeadlockDetector, Detection
from newfuse.core.locks import LockState, read_lock
from newfuse.core.orchestrator import Orchestrator, read_saga, saga_stream, start_saga
from newfuse.core.saga import Saga, SagaState, Step, StepContext, StepState, next_move

__all__ = [
    "DeadlockDetector",
    "Detection",
    "LockState",
    "Orchestrator",
    "Saga",
    "SagaState",
    "Step",
    "StepContext",
    "StepState",
    "next_move",
    "read_lock",
    "read_saga",
    "saga_stream",
    "start_saga",
]
