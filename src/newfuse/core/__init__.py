"""Transactions across agents: sagas (definitions, the fold of their streams, the orchestrator)."""

from newfuse.core.orchestrator import Orchestrator, read_saga, saga_stream, start_saga
from newfuse.core.saga import Saga, SagaState, Step, StepContext, StepState, next_move

__all__ = [
    "Orchestrator",
    "Saga",
    "SagaState",
    "Step",
    "StepContext",
    "StepState",
    "next_move",
    "read_saga",
    "saga_stream",
    "start_saga",
]
