"""The saga orchestrator: it folds each saga's stream, decides (core/saga.py `next_move`), and
writes what it did back to the stream, every write fenced by the stream's expected version.

How several orchestrator instances share the sagas: each follows every saga (a subscription on
the `saga` category) and tries to drive those not ended. Driving a step starts with a claim,
`saga.step_started`, appended expecting the version it read: of two instances that read the
same version, one claim is stored and the other gets WrongExpectedVersionError and waits. The
claim holds a lease (the step's timeout plus a grace); the outcome is appended expecting the
claim's version + 1. An instance that paused (SIGSTOP, a long GC, a lost network) past its
lease finds another instance's claim stored after its own, so its outcome is refused: it cannot
write once it lost the lease (a fencing token that is the stream version). Its action may
still have run: actions are at least once, keyed by `StepContext.idempotency_key`.

A crashed instance leaves a claim whose lease runs out; whoever looks next (the others are
woken by the lease's end, and on restart every instance catches up on the whole category)
claims the step again. The last step's outcome and `saga.committed` (or the last
compensation's and `saga.rolled_back`) are appended together, in one atomic append.

Locks (core/locks.py): a step's declared locks are acquired one at a time, in their order,
before its first claim (`saga.lock_waiting`, then the lock stream's request and grant, then
`saga.lock_acquired`, each write fenced by its stream's version); a wait wakes on the lock's
events and ends by the grant, by a detector's `saga.aborted` (core/deadlock.py) or by the
step's lock timeout, the last two failing the step for good. Every lock of a saga is released
once it has ended, by whichever instance sees it ended.

Reviews (core/review.py): a step declared with `review=` is preceded by its review. The driver
opens it (once), copies a decision into the saga's stream (`saga.step_reviewed`, fenced), and
otherwise lets go of the saga, holding no slot: the review's events (the `review` category is
followed) and a wake-up at its deadline drive it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from newfuse.core import locks
from newfuse.core import review as reviews
from newfuse.core.saga import (
    Acquire,
    AwaitReview,
    End,
    Run,
    Saga,
    SagaState,
    StepContext,
    Wait,
    next_move,
)
from newfuse.errors import (
    FuseError,
    SagaNotFoundError,
    SagaTimeoutError,
    UnknownSagaError,
    WrongExpectedVersionError,
)
from newfuse.eventstore import NO_STREAM, EventFilter, EventStore
from newfuse.schemas import (
    NewEvent,
    Phase,
    RecordedEvent,
    SagaCommitted,
    SagaLockAcquired,
    SagaLockWaiting,
    SagaRolledBack,
    SagaStarted,
    SagaStuck,
    StepCompleted,
    StepFailed,
    StepStarted,
)

log = logging.getLogger("newfuse.sagas")

CATEGORY = "saga"
LEASE_GRACE = 2.0
"""Seconds a claim's lease lasts beyond its step's timeout (an outcome on its way)."""
LOCK_POLL = 1.0
"""Seconds a lock wait sleeps at most between looks (lock events wake it before)."""


def saga_stream(saga_id: str) -> str:
    """The stream of one saga: `saga.<id>`."""
    return f"{CATEGORY}.{saga_id}"


async def read_saga(store: EventStore, saga_id: str) -> SagaState:
    """The fold of a saga's stream (an empty state, with no name, when it has no events)."""
    return SagaState.fold(saga_id, [event async for event in store.read(saga_stream(saga_id))])


async def start_saga(
    store: EventStore,
    saga: Saga,
    input: dict[str, Any] | None = None,
    *,
    saga_id: str | None = None,
) -> str:
    """Append a saga's `saga.started` (whichever orchestrator has its definition drives it);
    returns its id. Starting one id twice stores it once."""
    saga_id = saga_id or str(uuid.uuid4())
    started = SagaStarted(
        saga_id=saga_id,
        name=saga.name,
        input=input or {},
        steps=[step.name for step in saga.steps],
    )
    with contextlib.suppress(WrongExpectedVersionError):
        await store.append(
            saga_stream(saga_id), NewEvent(data=started, correlation_id=saga_id), NO_STREAM
        )
    return saga_id


class Orchestrator:
    """Drives the sagas of `sagas` (their definitions) on `store`.

    Use `async with Orchestrator(store, [order]) as orchestrator:` and `await
    orchestrator.start("order", {...})`; the sagas run in the background (each in its own
    task), also those another instance or an earlier run started. `wait(id)` waits for one to
    end.

    Args:
        store: the event store holding the `saga.<id>` streams.
        sagas: the definitions this instance can run.
        name: this instance's name in its claims (default: host, pid and a random part).
        concurrency: sagas driven at once at most.
    """

    def __init__(
        self,
        store: EventStore,
        sagas: Sequence[Saga],
        *,
        name: str | None = None,
        concurrency: int = 64,
    ) -> None:
        self.store = store
        self.sagas = {saga.name: saga for saga in sagas}
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.fenced = 0
        """Writes the store refused because another instance wrote first (a lost claim)."""
        self.runs = 0
        """Step attempts (actions and compensations) this instance ran."""
        self._slots = asyncio.Semaphore(concurrency)
        self._driving: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._ended: dict[str, asyncio.Event] = {}
        self._follow: asyncio.Task[None] | None = None
        self._follow_locks: asyncio.Task[None] | None = None
        self._follow_reviews: asyncio.Task[None] | None = None
        self._review_timers: dict[str, asyncio.TimerHandle] = {}
        """Saga -> the wake-up at its review's deadline."""
        self._waiting_on: dict[str, set[str]] = {}
        """Resource -> the sagas of ours waiting for its lock (woken by its events)."""
        self._releasing: set[asyncio.Task[None]] = set()
        self._written: dict[str, list[tuple[int, list[Any]]]] = {}
        """Saga -> this instance's writes (expected version, events) since its driver's last
        look (`_next_state` folds them in instead of reading the stream again)."""
        self._caught_up = asyncio.Event()
        self._closed = False

    async def __aenter__(self) -> Orchestrator:
        self._follow = asyncio.create_task(self._follow_sagas(), name=f"newfuse-saga-{self.name}")
        self._follow_locks = asyncio.create_task(
            self._follow_new(locks.CATEGORY, self._lock_event),
            name=f"newfuse-saga-locks-{self.name}",
        )
        self._follow_reviews = asyncio.create_task(
            self._follow_new(reviews.CATEGORY, self._review_event),
            name=f"newfuse-saga-reviews-{self.name}",
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop following and driving (a step running is cancelled: its claim's lease runs out
        and another instance, or the next run, claims it again; a lock wait is taken up by
        them too; the lock releases of a saga that ended finish first). Idempotent."""
        self._closed = True
        for timer in self._review_timers.values():
            timer.cancel()
        self._review_timers.clear()
        followers = (self._follow, self._follow_locks, self._follow_reviews)
        tasks = [t for t in (*followers, *self._driving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._driving.clear()
        if self._releasing:  # an ended saga's lock releases under way: let them finish
            await asyncio.wait(set(self._releasing), timeout=5.0)

    async def start(
        self, saga: Saga | str, input: dict[str, Any] | None = None, *, saga_id: str | None = None
    ) -> str:
        """Start a saga (append its `saga.started`); returns its id. Starting one id twice
        stores it once (the second finds the stream there and returns the id).

        Raises:
            UnknownSagaError: this instance has no such definition.
        """
        definition = self._definition(saga if isinstance(saga, str) else saga.name)
        saga_id = await start_saga(self.store, definition, input, saga_id=saga_id)
        self._kick(saga_id)
        return saga_id

    async def wait(self, saga_id: str, timeout: float = 30.0) -> SagaState:  # noqa: ASYNC109
        """The saga's state once it has ended (committed, rolled back or stuck).

        Raises:
            SagaTimeoutError: it had not ended within `timeout` seconds.
        """
        ended = self._ended.setdefault(saga_id, asyncio.Event())
        try:
            return await self._wait_ended(saga_id, ended, timeout)
        finally:  # a long-running instance keeps no event per saga it was once asked about
            if self._ended.get(saga_id) is ended:
                del self._ended[saga_id]

    async def _wait_ended(
        self,
        saga_id: str,
        ended: asyncio.Event,
        timeout: float,  # noqa: ASYNC109 - the caller's deadline
    ) -> SagaState:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # cleared before the read: an end stored while it reads sets it again (after
                    # the read, a set that came during it would be lost: a 0.5 s wait for nothing)
                    ended.clear()
                    state = await read_saga(self.store, saga_id)
                    if state.ended:
                        return state
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):  # also when another instance ends it
                            await ended.wait()
        except TimeoutError:
            state = await read_saga(self.store, saga_id)
            if state.ended:
                return state
            raise SagaTimeoutError(saga_id=saga_id, status=state.status, waited=timeout) from None

    async def state(self, saga_id: str) -> SagaState:
        """The saga's state as its stream has it now.

        Raises:
            SagaNotFoundError: it has no events.
        """
        state = await read_saga(self.store, saga_id)
        if not state.name:
            raise SagaNotFoundError(saga_id=saga_id)
        return state

    def _definition(self, name: str) -> Saga:
        definition = self.sagas.get(name)
        if definition is None:
            raise UnknownSagaError(name=name, known=sorted(self.sagas))
        return definition

    # -- following the category -----------------------------------------------------------------

    async def _follow_sagas(self) -> None:
        """Every saga event, from the start: each saga not ended is driven; each event wakes
        its driver (another instance's write ends its wait at once)."""
        while not self._closed:
            try:
                async with self.store.subscribe(EventFilter(categories=(CATEGORY,))) as feed:
                    async for event in feed:
                        saga_id = event.stream.partition(".")[2]
                        if event.type in ("saga.committed", "saga.rolled_back", "saga.stuck"):
                            self._finished(saga_id)
                            continue
                        self._kick(saga_id)
            except asyncio.CancelledError:
                raise
            except FuseError as error:  # the store is away: follow again once it is back
                log.warning("orchestrator %s: following sagas: %s; again in 1s", self.name, error)
                await asyncio.sleep(1.0)

    async def _follow_new(self, category: str, handle: Callable[[RecordedEvent], None]) -> None:
        """Every new event of `category` (from now on) goes to `handle`."""
        while not self._closed:
            try:
                head = await self.store.head_position()
                async with self.store.subscribe(
                    EventFilter(categories=(category,)), from_position=head + 1
                ) as feed:
                    async for event in feed:
                        handle(event)
            except asyncio.CancelledError:
                raise
            except FuseError as error:  # lock waits poll meanwhile (LOCK_POLL)
                log.warning(
                    "orchestrator %s: following %s: %s; again in 1s", self.name, category, error
                )
                await asyncio.sleep(1.0)

    def _lock_event(self, event: RecordedEvent) -> None:
        """A lock event wakes the sagas of ours waiting for that resource."""
        resource = event.stream.partition(".")[2]
        for saga_id in self._waiting_on.get(resource, ()):
            self._wake.setdefault(saga_id, asyncio.Event()).set()

    def _review_event(self, event: RecordedEvent) -> None:
        """A review event drives the saga it names (a body that names none is left alone)."""
        saga_id = getattr(event.data, "saga_id", None)
        if isinstance(saga_id, str) and saga_id:
            self._kick(saga_id)

    def _kick(self, saga_id: str) -> None:
        """Drive `saga_id` (if no task of ours does) and wake its driver."""
        self._wake.setdefault(saga_id, asyncio.Event()).set()
        task = self._driving.get(saga_id)
        if (task is None or task.done()) and not self._closed:
            self._driving[saga_id] = asyncio.create_task(
                self._drive(saga_id), name=f"newfuse-saga-{saga_id}"
            )

    def _finished(self, saga_id: str) -> None:
        timer = self._review_timers.pop(saga_id, None)
        if timer is not None:
            timer.cancel()
        ended = self._ended.get(saga_id)
        if ended is not None:
            ended.set()
        wake = self._wake.pop(saga_id, None)
        if wake is not None:
            wake.set()

    # -- driving one saga -------------------------------------------------------------------------

    async def _drive(self, saga_id: str) -> None:
        try:
            async with self._slots:
                await self._drive_until_ended(saga_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug or a store outage: log it; the next event kicks it again
            log.exception("orchestrator %s: saga %s", self.name, saga_id)
        finally:
            if self._driving.get(saga_id) is asyncio.current_task():
                del self._driving[saga_id]
                self._written.pop(saga_id, None)

    async def _drive_until_ended(self, saga_id: str) -> None:
        wake = self._wake.setdefault(saga_id, asyncio.Event())
        state: SagaState | None = None
        while True:
            wake.clear()
            state = await self._next_state(saga_id, state)
            if not state.name or state.ended:
                if state.ended:
                    # shielded: close() cancelling this driver lets the releases finish
                    release = asyncio.create_task(self._release_locks(state))
                    self._releasing.add(release)
                    release.add_done_callback(self._releasing.discard)
                    await asyncio.shield(release)
                    self._finished(saga_id)
                return
            definition = self.sagas.get(state.name)
            if definition is None:  # another instance's kind of saga: leave it to that one
                log.debug(
                    "orchestrator %s: no definition %r for %s", self.name, state.name, saga_id
                )
                return
            move = next_move(definition, state, _now())
            if move is None:
                return
            if isinstance(move, Wait):
                pause = (move.until - _now()).total_seconds()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, pause) + 0.05):
                        await wake.wait()
                continue
            if isinstance(move, End):
                await self._end(definition, state, move)
                continue
            if isinstance(move, Acquire):
                await self._acquire(definition, state, move, wake)
                continue
            if isinstance(move, AwaitReview):
                if await self._await_review(definition, state, move) and not wake.is_set():
                    return  # the review's next event, or its deadline, drives the saga again
                continue
            await self._run(definition, state, move)

    async def _next_state(self, saga_id: str, known: SagaState | None) -> SagaState:
        """The saga's state for the next move: `known` with this instance's own writes since
        folded in, when they follow on from it; else the stream read again.

        After a write stored at the version `known` has, the stream is `known` plus what was
        written (the version check says so), so no read is needed to know it. A write by
        another instance after it makes that state stale, but then the next write, fenced by
        its expected version, is refused, and the look after it reads the stream.
        """
        written = self._written.pop(saga_id, [])
        if known is None or not written:
            return await read_saga(self.store, saga_id)
        for expected, events in written:
            if expected != known.version:
                return await read_saga(self.store, saga_id)
            for data in events:
                known.apply_data(data, "this instance's write")
            known.version += len(events)
        return known

    async def _acquire(
        self, definition: Saga, state: SagaState, move: Acquire, wake: asyncio.Event
    ) -> None:
        """One look at the lock `move` wants: note the wait in the saga's stream, ask for the
        lock, take it when it is free, fail the step when the wait outlasts its lock timeout,
        or sleep until the lock's or the saga's next event (a detector's abort ends the wait)."""
        step = definition.get(move.step)
        wait = state.lock_wait
        if wait is None or wait.resource != move.resource:
            # the saga's stream says it waits before the lock's does, so a detector that sees
            # the request finds the saga waiting (and can abort it at that version)
            waiting = SagaLockWaiting(saga_id=state.id, step=step.name, resource=move.resource)
            await self._append(state, [waiting])
            return
        waiters = self._waiting_on.setdefault(move.resource, set())
        waiters.add(state.id)
        try:
            await locks.request(self.store, move.resource, state.id, step.name)
            token = await locks.try_grant(self.store, move.resource, state.id, step.name)
            if token is not None:
                # refused when the saga moved on (an abort): the grant is released at its end
                acquired = SagaLockAcquired(
                    saga_id=state.id, step=step.name, resource=move.resource, token=token
                )
                await self._append(state, [acquired])
                return
            due = wait.since + timedelta(seconds=step.lock_timeout)
            left = (due - _now()).total_seconds()
            if left <= 0:
                attempt = state.steps[step.name].attempts + 1
                timed_out = StepFailed(
                    saga_id=state.id,
                    step=step.name,
                    attempt=attempt,
                    error=(
                        f"lock wait for {move.resource!r} timed out after {step.lock_timeout:g}s"
                    ),
                    retryable=False,
                )
                await self._append(state, [timed_out])
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, LOCK_POLL)):
                    await wake.wait()
        finally:
            waiters.discard(state.id)
            if not waiters:
                self._waiting_on.pop(move.resource, None)

    async def _await_review(self, definition: Saga, state: SagaState, move: AwaitReview) -> bool:
        """Open the step's review (once), apply its deadline when due, and copy a decision into
        the saga's stream; True when it is still undecided (the saga waits)."""
        step = definition.get(move.step)
        assert step.review is not None  # next_move awaits reviews only of steps that have one
        review_id = reviews.review_id(state.id, step.name)
        review = await reviews.read_review(self.store, review_id)
        if not review.requested:
            ctx = self._context(state, step.name, "action", 0)
            try:
                request = reviews.request_for(
                    step.review, saga_name=definition.name, ctx=ctx, now=_now()
                )
            except Exception as error:  # the definition's summary or proposal: a bug of it
                await self._review_failed(state, step.name, f"{type(error).__name__}: {error}")
                return False
            review = await reviews.open_review(self.store, request)
        if (review.saga_id, review.step) != (state.id, step.name):  # written by someone else
            await self._review_failed(
                state,
                step.name,
                f"review {review_id} requests saga {review.saga_id!r} "
                f"step {review.step!r}, not this one",
            )
            return False
        if not review.decided:
            review = await reviews.expire_if_due(self.store, review_id, _now())
        decision = review.decision()
        if decision is not None:
            await self._append(state, [decision])
            return False
        if review.deadline is not None:
            self._wake_at(state.id, review.deadline)
        return True

    async def _review_failed(self, state: SagaState, step: str, why: str) -> None:
        """The step's review cannot be opened: the step fails for good (the saga compensates)."""
        log.error("saga %s: the review of %s: %s", state.id, step, why)
        failed = StepFailed(
            saga_id=state.id, step=step, attempt=1, error=f"review: {why}", retryable=False
        )
        await self._append(state, [failed])

    def _wake_at(self, saga_id: str, when: datetime) -> None:
        """Drive `saga_id` again at `when` (its review's deadline). This is where a JetStream
        scheduled message (core/timers.py, once merged) replaces the in-process timer."""
        old = self._review_timers.pop(saga_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, (when - _now()).total_seconds()) + 0.05

        def due() -> None:
            self._review_timers.pop(saga_id, None)
            self._kick(saga_id)

        self._review_timers[saga_id] = loop.call_at(loop.time() + delay, due)

    def _context(self, state: SagaState, step: str, phase: Phase, attempt: int) -> StepContext:
        """What an attempt of `step`'s `phase` sees."""
        reviewed = state.steps[step].reviewed
        return StepContext(
            saga_id=state.id,
            step=step,
            phase=phase,
            attempt=attempt,
            input=state.step_input(step),
            outputs=state.outputs,
            locks=dict(state.locks),
            review=reviewed if reviewed is not None and reviewed.decision == "approved" else None,
        )

    async def _release_locks(self, state: SagaState) -> None:
        """Let go of every lock an ended saga holds or asked for (idempotent: each
        orchestrator that sees it ended may do it)."""
        for resource in state.requested:
            if await locks.release(self.store, resource, state.id, f"saga {state.status}"):
                log.debug("saga %s released %s", state.id, resource)

    async def _run(self, definition: Saga, state: SagaState, move: Run) -> None:
        try:
            await self._claim_and_run(definition, state, move)
        except asyncio.CancelledError:  # this instance stops: give back a claim it may hold
            released = StepFailed(
                **_of(state, move),
                error=f"orchestrator {self.name} stopped",
                released=True,
            )
            # expecting the claim's version: refused when the claim was never stored, or when
            # its outcome was (then there is nothing to give back)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._append_at(state.id, state.version + 1, [released]))
            raise

    async def _claim_and_run(self, definition: Saga, state: SagaState, move: Run) -> None:
        step = definition.get(move.step)
        lease = step.timeout + LEASE_GRACE
        claim = StepStarted(
            saga_id=state.id,
            step=step.name,
            phase=move.phase,
            attempt=move.attempt,
            driver=self.name,
            lease_until=_now() + timedelta(seconds=lease),
        )
        if not await self._append(state, [claim]):
            return
        ctx = self._context(state, step.name, move.phase, move.attempt)
        fn = step.action if move.phase == "action" else step.compensation
        assert fn is not None  # next_move compensates only steps that have a compensation
        self.runs += 1
        outcome: Any
        try:
            async with asyncio.timeout(step.timeout):
                output = await fn(ctx)
            outcome = StepCompleted(
                **_of(state, move),
                output=msgspec.to_builtins(output),
            )
        except TimeoutError:
            outcome = StepFailed(
                **_of(state, move),
                error=f"timed out after {step.timeout:g}s",
            )
        except Exception as error:
            retryable = not isinstance(error, FuseError) or error.retryable
            outcome = StepFailed(
                **_of(state, move),
                error=f"{type(error).__name__}: {error}",
                retryable=retryable,
            )
        claimed = state.version + 1
        events: list[Any] = [outcome]
        closing = self._closing(definition, state, claim, outcome)
        if closing is not None:
            events.append(closing)
        await self._append_at(state.id, claimed, events)

    def _closing(self, definition: Saga, state: SagaState, claim: Any, outcome: Any) -> Any:
        """The saga's end when `outcome` is its last outcome: stored with it, atomically."""
        after = copy.deepcopy(state)
        after.apply_data(claim, "the claim")
        after.apply_data(outcome, "the outcome")
        move = next_move(definition, after, _now())
        if isinstance(move, End) and move.status == "committed":
            return SagaCommitted(saga_id=state.id)
        if isinstance(move, End) and move.status == "rolled_back":
            return SagaRolledBack(saga_id=state.id, failed_step=move.step, error=move.error)
        return None

    async def _end(self, definition: Saga, state: SagaState, move: End) -> None:
        event: Any
        if move.status == "committed":
            event = SagaCommitted(saga_id=state.id)
        elif move.status == "rolled_back":
            event = SagaRolledBack(saga_id=state.id, failed_step=move.step, error=move.error)
        else:
            event = SagaStuck(saga_id=state.id, step=move.step, error=move.error)
            log.error("saga %s stuck: compensation of %s: %s", state.id, move.step, move.error)
        await self._append(state, [event])

    async def _append(self, state: SagaState, events: list[Any]) -> bool:
        return await self._append_at(state.id, state.version, events)

    async def _append_at(self, saga_id: str, expected: int, events: list[Any]) -> bool:
        """Append `events` expecting version `expected`; False when another write came first
        (this instance lost the claim or the race: its write is fenced off)."""
        try:
            await self.store.append(
                saga_stream(saga_id),
                [NewEvent(data=event, correlation_id=saga_id) for event in events],
                expected,
            )
        except WrongExpectedVersionError:
            self.fenced += 1
            log.info("orchestrator %s: saga %s moved on before its write", self.name, saga_id)
            return False
        self._written.setdefault(saga_id, []).append((expected, events))
        return True


def _of(state: SagaState, move: Run) -> dict[str, Any]:
    """The fields an attempt's events share: which saga, step, phase and attempt."""
    return {"saga_id": state.id, "step": move.step, "phase": move.phase, "attempt": move.attempt}


def _now() -> datetime:
    return datetime.now(UTC)
