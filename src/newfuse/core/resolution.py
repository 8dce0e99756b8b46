"""A person resolves a stuck saga: its compensation kept failing, and nothing more runs on its
own until someone says what happened (`fuse sagas resolve`).

`rolled_back`: the person undid the step by hand; the saga is rolled back (and its locks are
released). `retry`: the stuck compensation gets fresh attempts (as many as its definition
gives), and the orchestrator carries on compensating. Either is a `saga.resolved` event with
who, when and why, appended expecting the version at which the saga was stuck: of two people
resolving at once one is stored, and the other is told who did.
"""

from __future__ import annotations

from typing import Literal

from newfuse.core.orchestrator import read_saga, saga_stream
from newfuse.core.saga import SagaState
from newfuse.errors import (
    ReviewInputError,
    SagaNotFoundError,
    SagaNotStuckError,
    WrongExpectedVersionError,
)
from newfuse.eventstore import EventStore
from newfuse.schemas import NewEvent, SagaResolved

Resolution = Literal["rolled_back", "retry"]
MAX_COMMENT = 4096


async def resolve_saga(
    store: EventStore,
    saga_id: str,
    resolution: Resolution,
    *,
    by: str,
    comment: str,
) -> SagaState:
    """Resolve the stuck saga `saga_id` (see the module); its state after.

    Raises:
        SagaNotFoundError: no such saga.
        SagaNotStuckError: it is not stuck (it never was, or someone resolved it first).
        ReviewInputError: no comment, or one too long, or no name.
    """
    if not comment.strip() or len(comment) > MAX_COMMENT:
        raise ReviewInputError(
            what="the comment", reason=f"a resolution says why, in 1 to {MAX_COMMENT} characters"
        )
    if not by.strip():
        raise ReviewInputError(what="the resolver", reason="a resolution says who resolved it")
    state = await read_saga(store, saga_id)
    if not state.name:
        raise SagaNotFoundError(saga_id=saga_id)
    stuck = next((s.name for s in state.steps.values() if s.status == "stuck"), None)
    if state.status != "stuck" or stuck is None:
        last = state.resolutions[-1].by if state.resolutions else None
        raise SagaNotStuckError(saga_id=saga_id, status=state.status, resolved_by=last)
    event = SagaResolved(saga_id=saga_id, step=stuck, resolution=resolution, by=by, comment=comment)
    try:
        await store.append(
            saga_stream(saga_id), NewEvent(data=event, correlation_id=saga_id), state.version
        )
    except WrongExpectedVersionError:
        state = await read_saga(store, saga_id)
        last = state.resolutions[-1].by if state.resolutions else None
        raise SagaNotStuckError(saga_id=saga_id, status=state.status, resolved_by=last) from None
    return await read_saga(store, saga_id)
