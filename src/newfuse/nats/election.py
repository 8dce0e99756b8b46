"""Riding out JetStream leader elections and reconnects: an idempotent step retried to one deadline.

What a clustered JetStream answers while a stream elects a new leader (measured on nats-server
2.15, 3 nodes): a publish gets status 503 (no responders: only the leader listens on the
stream's subjects) or, if it was in flight when the leader died, no answer at all; API requests
time out or answer 503 / "JetStream cluster not available"; a client whose server died
reconnects to another in about `reconnect_wait`. All of these are retryable FuseErrors, and all
pass within seconds, so the step is repeated (each attempt waiting a short, growing time for its
answer) until it succeeds, fails for good, or the deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from newfuse.errors import ElectionTimeoutError, FuseError, StoreUnavailableError
from newfuse.telemetry import meter

log = logging.getLogger("newfuse.nats")

_RIDDEN_OUT = meter().create_counter(
    "newfuse.store.elections_ridden_out",
    unit="{operation}",
    description="operations that succeeded after riding out a leader election or reconnect "
    "(at least one retryable failure first), by operation kind",
)

T = TypeVar("T")

FIRST_ATTEMPT_WAIT: Final = 1.0
"""Seconds the first attempt waits for an answer (then twice that, up to the caller's timeout):
an answer lost with a dead leader is asked for again soon, not after the whole timeout."""
_FIRST_PAUSE: Final = 0.05
_MAX_PAUSE: Final = 0.5


async def ride_out(
    step: Callable[[float], Awaitable[T]],
    *,
    operation: str,
    deadline: float,
    timeout: float,  # noqa: ASYNC109 - the longest one attempt waits for its answer
    on_retry: Callable[[FuseError], None] | None = None,
    failed: FuseError | None = None,
) -> T:
    """`await step(wait)` until it returns, raises a non-retryable error, or `deadline` passes.

    Args:
        step: one attempt; it gets the seconds it may wait for an answer. It must be safe to
            repeat (same event ids, same expected sequence).
        operation: what is being done, for the error.
        deadline: the event loop time after which no attempt starts (one deadline for all).
        timeout: the longest wait of one attempt.
        on_retry: called with each retryable failure before the next attempt.
        failed: the retryable error of a first attempt the caller made itself (its fast path,
            waiting `FIRST_ATTEMPT_WAIT`); the next attempt comes after a pause.

    Raises:
        ElectionTimeoutError: still failing with retryable errors at the deadline.
        Any non-retryable error of `step`, at once.
    """
    loop = asyncio.get_running_loop()
    wait = min(timeout, FIRST_ATTEMPT_WAIT)
    pause = _FIRST_PAUSE
    attempts = 0 if failed is None else 1
    started = loop.time()
    error = failed
    while True:
        if error is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                last = error.reason if isinstance(error, StoreUnavailableError) else str(error)
                raise ElectionTimeoutError(
                    operation=operation,
                    seconds=round(loop.time() - started, 1),
                    attempts=attempts,
                    last=last,
                ) from error
            if on_retry is not None:
                on_retry(error)
            log.debug("%s: attempt %d failed (%s); retrying", operation, attempts, error)
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, _MAX_PAUSE)
            wait = min(wait * 2, timeout)
        attempts += 1
        try:
            result = await step(max(0.05, min(wait, deadline - loop.time())))
        except FuseError as failure:
            if not failure.retryable:
                raise
            error = failure
        else:
            if error is not None:
                _RIDDEN_OUT.add(1, {"operation": _kind(operation)})
            return result


def _kind(operation: str) -> str:
    """The kind of an operation for a metric attribute: no stream names (unbounded cardinality).

    "append to 'agent.a1'" -> "append", "provision stream 'FUSE_EVENTS'" -> "provision stream".
    """
    return re.split(r" (?:to|on|of) |'", operation, maxsplit=1)[0].strip() or operation
