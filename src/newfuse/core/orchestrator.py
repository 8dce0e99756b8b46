"""The saga orchestrator: it folds each saga's stream, decides (core/saga.py `moves`), and
writes what it did back to the stream, every write fenced by the stream's expected version.

How several orchestrator instances share the sagas: each follows every saga (a subscription on
the `saga` category) and tries to drive those not ended. Driving a step starts with a claim,
`saga.step_started`, appended expecting the version it read: of two instances that read the
same version, one claim is stored and the other gets WrongExpectedVersionError and waits. The
claim holds a lease (the step's timeout plus a grace). The outcome is appended expecting the
claim's version + 1; when something came after the claim (the steps of a parallel group write
to one stream at once), the instance reads the stream again, checks that the step's latest
claim is still its own (driver and attempt, no outcome yet) and appends expecting the version
it read, and again on a conflict. An instance that paused (SIGSTOP, a long GC, a lost network)
past its lease finds another instance's claim stored after its own, so its outcome is refused:
it cannot write once it lost the lease (the claim in the stream, checked under the stream's
version, is the fencing token). Its action may still have run: actions are at least once,
keyed by `StepContext.idempotency_key`.

Parallel groups: the moves of a saga (core/saga.py `moves`) may be several runs at once; their
claims are one append, and each attempt runs in its own task under the saga's driver, which
meanwhile follows the saga's events (a lock wait, the other steps' outcomes).

A crashed instance leaves a claim whose lease runs out; whoever looks next (the others are
woken by the lease's end, and on restart every instance catches up on the whole category)
claims the step again. The last step's outcome is stored inside `saga.committed` (or the last
compensation's, or the final failure, inside `saga.rolled_back`): one event, so the end and the
outcome that made it are one write.

Locks (core/locks.py): a step's declared locks are acquired one at a time, in their order,
before its first claim (`saga.lock_waiting`, then the lock stream's request and grant, then
`saga.lock_acquired`, each write fenced by its stream's version); a wait wakes on the lock's
events and ends by the grant, by a detector's `saga.aborted` (core/deadlock.py) or by the
step's lock timeout, the last two failing the step for good. Every lock of a saga is released
once it has ended, by whichever instance sees it ended.

Timers (core/timers.py): a claim sets its step's timer to its lease's end, a retry's backoff and
a lock wait set it to their due time, and the outcome cancels it; a review's deadline has a
timer too. Every instance shares the fires (JetStream message schedules where the server has
them), and a fire kicks its saga: `moves` decides, so a fire for a step that moved on does
nothing. A Wait therefore sleeps until the saga's next event or its timer, not in a loop; a
long safety poll (`safety_poll`) remains for what a timer cannot promise: a fire lost to an
outage or dropped as stale, an in-process timer of an instance that died.

Reviews (core/review.py): a step declared with `review=` is preceded by its review. The driver
opens it (once), copies a decision into the saga's stream (`saga.step_reviewed`, fenced), and
otherwise lets go of the saga, holding no slot: the review's events (the `review` category is
followed) and a wake-up at its deadline drive it again.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    Move,
    Run,
    Saga,
    SagaState,
    StepContext,
    Wait,
    moves,
)
from newfuse.core.timers import Alarm, Fire, Timers, open_timers, timer_key
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
"""Seconds a lock wait sleeps at most between looks (lock events wake it before; a release
seen between the saga's read and the wait's start wakes nothing, hence a short poll)."""
LOOK_AGAIN = 5.0
"""Seconds a driver waits at most for its saga's next event, while attempts of its own run or
reviews are open, before it reads the stream again."""
RECORD_TRIES = 100
"""Appends an outcome tries at most when other writes to its saga keep coming first."""
SAFETY_POLL = 30.0
"""Seconds a Wait sleeps at most when its timer is set (the timer or the saga's next event
ends it before): the look that still comes when a fire was lost or dropped."""
STALE_AFTER = 300.0
"""Seconds after its time a step's timer may still fire; later it is dropped (a restarted
orchestrator re-reads every saga anyway)."""


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
        groups=saga.groups,
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
        timers: where step timers are set and fired (default: `open_timers(store, "saga")`,
            JetStream schedules on a server that has them, owned and closed by this instance).
            The instances of one namespace share its fires, each going to one of them: where
            instances on one prefix run different kinds of saga, give each kind a namespace of
            its own (`open_timers(store, "billing")`), so a fire reaches one that can drive it.
        safety_poll: seconds a Wait sleeps at most when its timer is set.
    """

    def __init__(
        self,
        store: EventStore,
        sagas: Sequence[Saga],
        *,
        name: str | None = None,
        concurrency: int = 64,
        timers: Timers | None = None,
        safety_poll: float = SAFETY_POLL,
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
        self._review_timers: dict[str, dict[str, datetime]] = {}
        """Saga -> the key and time of each timer this instance set at a review's deadline."""
        self._waiting_on: dict[str, set[str]] = {}
        """Resource -> the sagas of ours waiting for its lock (woken by its events)."""
        self._releasing: set[asyncio.Task[None]] = set()
        self._written: dict[str, list[tuple[int, list[Any]]]] = {}
        """Saga -> this instance's writes (expected version, events) since its driver's last
        look (`_next_state` folds them in instead of reading the stream again)."""
        self._caught_up = asyncio.Event()
        self._closed = False
        self.timers = timers
        self._owns_timers = timers is None
        self.safety_poll = safety_poll
        self._fired: set[str] = set()
        """Sagas whose timer fired since their driver last looked."""

    async def __aenter__(self) -> Orchestrator:
        if self.timers is None:
            self.timers = await open_timers(self.store, "saga")
        await self.timers.start(self._on_fire)
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
        self._review_timers.clear()  # their timers stay set: any instance takes the fire
        followers = (self._follow, self._follow_locks, self._follow_reviews)
        tasks = [t for t in (*followers, *self._driving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._driving.clear()
        if self._releasing:  # an ended saga's lock releases under way: let them finish
            await asyncio.wait(set(self._releasing), timeout=5.0)
        if self.timers is not None and self._owns_timers:
            await self.timers.close()

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

    async def _on_fire(self, fire: Fire) -> None:
        """A timer of a saga fired (here or for another instance): look at the saga again."""
        saga_id = fire.key.partition(".")[0]
        self._fired.add(saga_id)
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
        for key in self._review_timers.pop(saga_id, {}):
            assert self.timers is not None  # set only by a driver, after __aenter__
            self.timers.cancel_soon(key)
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
        running: dict[str, asyncio.Task[None]] = {}
        """Step -> this instance's attempt of it in flight."""
        alarms: dict[str, Alarm] = {}
        """Step -> the timer this driver set for it last."""
        state: SagaState | None = None
        try:
            while True:
                wake.clear()
                fired = saga_id in self._fired
                self._fired.discard(saga_id)
                for name in [name for name, task in running.items() if task.done()]:
                    del running[name]
                state = await self._next_state(saga_id, state)
                if not state.name or state.ended:
                    if state.ended:
                        await self._ended_saga(state)
                    return
                definition = self.sagas.get(state.name)
                if definition is None:  # another instance's kind of saga: leave it to that one
                    log.debug(
                        "orchestrator %s: no definition %r for %s", self.name, state.name, saga_id
                    )
                    return
                found = moves(definition, state, _now())
                if not found and not running:
                    return
                if await self._make(definition, state, found, running, wake, alarms):
                    continue
                if not running and not wake.is_set():
                    if all(isinstance(move, AwaitReview) for move in found):
                        return  # the reviews' next events, or their deadlines, drive it again
                waits = [move for move in found if isinstance(move, Wait)]
                pause = LOOK_AGAIN if running or not waits else self.safety_poll
                for move in waits:
                    pause = min(pause, await self._wait_for(state, move, alarms, fired))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await wake.wait()
        finally:  # stopping (or ended): the attempts in flight give their claims back
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)

    async def _make(
        self,
        definition: Saga,
        state: SagaState,
        found: list[Move],
        running: dict[str, asyncio.Task[None]],
        wake: asyncio.Event,
        alarms: dict[str, Alarm],
    ) -> bool:
        """Make the moves `found` that need a write: claim the runs (together) and start them,
        append the end, or look at a lock; False when all there is to do is wait."""
        runs = [move for move in found if isinstance(move, Run) and move.step not in running]
        if runs:
            for run in runs:  # a claim sets the step's timer itself
                alarms.pop(run.step, None)
            claimed, contexts = await self._claim(definition, state, runs)
            if len(found) == 1 and len(contexts) == 1 and not running:
                # a lone step (no group): run by the driver itself, nothing else to follow
                await self._attempt(definition, runs[0], contexts[0][1], claimed, wake)
                return True
            for run, ctx in contexts:
                running[run.step] = asyncio.create_task(
                    self._attempt(definition, run, ctx, claimed, wake),
                    name=f"newfuse-saga-{state.id}-{run.step}",
                )
            return True
        for move in found:
            if isinstance(move, End):
                await self._end(definition, state, move)
                return True
        for move in found:  # before a lock wait, which may sleep: reviews open at once
            if isinstance(move, AwaitReview) and not await self._await_review(
                definition, state, move
            ):
                return True  # decided (copied into the stream), or failed
        for move in found:
            if isinstance(move, Acquire):
                await self._acquire(definition, state, move, wake, self._alarm(alarms, move))
                return True
        return False

    def _alarm(self, alarms: dict[str, Alarm], move: Wait | Acquire) -> Alarm:
        """The driver's timer for `move`'s step."""
        alarm = alarms.get(move.step)
        if alarm is None:
            assert self.timers is not None
            alarm = alarms[move.step] = Alarm(self.timers, stale_after=STALE_AFTER)
        return alarm

    async def _wait_for(
        self, state: SagaState, move: Wait, alarms: dict[str, Alarm], fired: bool
    ) -> float:
        """Set the timer that ends the Wait `move`; the seconds to sleep at most for it: the
        safety poll when the timer (or the saga's next event) wakes the driver, else the rest
        of the wait (its timer fired before the wait's end by our clock, the server's running
        ahead, or could not be set)."""
        timer = await self._alarm(alarms, move).set(timer_key(state.id, move.step), move.until)
        if timer == "new" or (timer == "same" and not fired):
            return self.safety_poll
        return max(0.0, (move.until - _now()).total_seconds()) + 0.05

    async def _ended_saga(self, state: SagaState) -> None:
        # shielded: close() cancelling this driver lets the releases finish
        release = asyncio.create_task(self._release_locks(state))
        self._releasing.add(release)
        release.add_done_callback(self._releasing.discard)
        await asyncio.shield(release)
        self._finished(state.id)

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
        # in the order stored: a group's attempts finish in any order
        for expected, events in sorted(written, key=lambda write: write[0]):
            if expected != known.version:
                return await read_saga(self.store, saga_id)
            for data in events:
                known.apply_data(data, "this instance's write")
            known.version += len(events)
        return known

    async def _acquire(
        self,
        definition: Saga,
        state: SagaState,
        move: Acquire,
        wake: asyncio.Event,
        alarm: Alarm,
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
            # the lock timeout wakes whichever instance is up, should this one die meanwhile
            await alarm.set(timer_key(state.id, step.name), due)
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
        assert step.review is not None  # moves awaits reviews only of steps that have one
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
            self._wake_at(state.id, step.name, review.deadline)
        return True

    async def _review_failed(self, state: SagaState, step: str, why: str) -> None:
        """The step's review cannot be opened: the step fails for good (the saga compensates)."""
        log.error("saga %s: the review of %s: %s", state.id, step, why)
        failed = StepFailed(
            saga_id=state.id, step=step, attempt=1, error=f"review: {why}", retryable=False
        )
        await self._append(state, [failed])

    def _wake_at(self, saga_id: str, step: str, when: datetime) -> None:
        """Drive `saga_id` again at `when` (its review's deadline), on whichever instance takes
        the timer's fire: `<saga id>.<step>.review`, set once per deadline, in the background,
        never dropped as stale (a late deadline is applied late, not skipped)."""
        assert self.timers is not None
        key = timer_key(saga_id, step, "review")
        set_here = self._review_timers.setdefault(saga_id, {})
        if set_here.get(key) == when:
            return
        set_here[key] = when
        self.timers.schedule_soon(key, when)

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
            reason = f"saga {state.status}"
            if await locks.release(self.store, resource, state.id, reason, final=state.settled):
                log.debug("saga %s released %s", state.id, resource)

    async def _claim(
        self, definition: Saga, state: SagaState, runs: list[Run]
    ) -> tuple[SagaState, list[tuple[Run, StepContext]]]:
        """Claim every attempt of `runs` in one append (expecting the version read): the saga
        as the claims left it, and what each attempt sees (none when another write came
        first)."""
        claims = [
            StepStarted(
                **_of(state.id, move),
                driver=self.name,
                lease_until=_now()
                + timedelta(seconds=definition.get(move.step).timeout + LEASE_GRACE),
            )
            for move in runs
        ]
        if not await self._append(state, claims):
            return state, []
        state = state.copy()  # the driver's own is its to fold (`_next_state`)
        contexts = [
            (
                move,
                self._context(state, move.step, move.phase, move.attempt),
            )
            for move in runs
        ]
        assert self.timers is not None
        for claim in claims:  # the attempts' copy: the saga as the claims left it
            state.apply_data(claim, "the claim")
            # in the background: the step's latency does not wait for the timer's acknowledgement
            self.timers.schedule_soon(
                timer_key(state.id, claim.step), claim.lease_until, stale_after=STALE_AFTER
            )
        state.version += len(claims)
        return state, contexts

    async def _attempt(
        self,
        definition: Saga,
        move: Run,
        ctx: StepContext,
        claimed: SagaState,
        wake: asyncio.Event,
    ) -> None:
        """Run one claimed attempt and record its outcome (a claim given back when cancelled)."""
        try:
            outcome = await self._outcome(definition, move, ctx)
            if await self._record(definition, move, outcome, claimed):
                assert self.timers is not None  # fenced off, the new claim's timer is not ours
                self.timers.cancel_soon(timer_key(ctx.saga_id, move.step))
        except asyncio.CancelledError:  # this instance stops: give back a claim it still holds
            released = StepFailed(
                **_of(ctx.saga_id, move),
                error=f"orchestrator {self.name} stopped",
                released=True,
            )
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._record(definition, move, released, claimed))
            raise
        except Exception:  # the store failed us: the claim's lease runs out, it is run again
            log.exception("orchestrator %s: saga %s step %s", self.name, ctx.saga_id, move.step)
        finally:
            wake.set()

    async def _outcome(self, definition: Saga, move: Run, ctx: StepContext) -> Any:
        """Run the step's action or compensation: its `saga.step_completed` or `_failed`."""
        step = definition.get(move.step)
        fn = step.action if move.phase == "action" else step.compensation
        assert fn is not None  # moves compensates only steps that have a compensation
        self.runs += 1
        of = _of(ctx.saga_id, move)
        try:
            async with asyncio.timeout(step.timeout):
                output = await fn(ctx)
            return StepCompleted(**of, output=msgspec.to_builtins(output))
        except TimeoutError:
            return StepFailed(**of, error=f"timed out after {step.timeout:g}s")
        except Exception as error:
            retryable = not isinstance(error, FuseError) or error.retryable
            return StepFailed(
                **of,
                error=f"{type(error).__name__}: {error}",
                retryable=retryable,
            )

    async def _record(
        self, definition: Saga, move: Run, outcome: StepCompleted | StepFailed, claimed: SagaState
    ) -> bool:
        """Append an attempt's outcome (with the saga's end when it is the last), fenced: first
        expecting the claim's version (`claimed` is the saga as the claim left it: nothing came
        after it), then, after other writes, expecting the version of a read in which the
        step's latest claim is still ours. False when it is not (another instance took the
        step over, or the outcome is stored already): this write is fenced off."""
        state = claimed
        for tries in range(RECORD_TRIES):
            if tries:  # something came after the claim: read on, check the claim, append again
                state = await self._read_on(state)
                if not self._holds(state, move):
                    self.fenced += 1
                    log.info(
                        "orchestrator %s: saga %s step %s was taken over before its outcome",
                        self.name,
                        state.id,
                        move.step,
                    )
                    return False
            events = [self._closing(definition, state, outcome) or outcome]
            try:
                await self.store.append(
                    saga_stream(state.id),
                    [NewEvent(data=event, correlation_id=state.id) for event in events],
                    state.version,
                )
                self._written.setdefault(state.id, []).append((state.version, events))
                return True
            except WrongExpectedVersionError:
                continue
        log.warning("orchestrator %s: saga %s: gave up recording %s", self.name, state.id, move)
        return False

    async def _read_on(self, state: SagaState) -> SagaState:
        """`state` with the events stored after it folded in (a copy: others share it)."""
        state = state.copy()
        async for event in self.store.read(saga_stream(state.id), from_version=state.version + 1):
            state.apply(event)
        return state

    def _holds(self, state: SagaState, move: Run) -> bool:
        """Whether the latest claim of `move`'s step in `state` is this instance's attempt,
        still without an outcome."""
        step = state.steps.get(move.step)
        return (
            not state.ended
            and step is not None
            and step.status in ("running", "compensating")
            and step.phase == move.phase
            and step.driver == self.name
            and step.attempts == move.attempt
        )

    def _closing(
        self, definition: Saga, state: SagaState, outcome: StepCompleted | StepFailed
    ) -> SagaCommitted | SagaRolledBack | None:
        """The saga's end, `outcome` inside it, when `outcome` is its last: one event, so the
        last outcome and the end are stored at once (one write: no batch needed)."""
        after = state.copy()
        after.apply_data(outcome, "the outcome")
        found = moves(definition, after, _now())
        move = found[0] if len(found) == 1 else None
        if not isinstance(move, End) or move.status == "stuck":
            return None
        completed = outcome if isinstance(outcome, StepCompleted) else None
        if move.status == "committed":
            return SagaCommitted(saga_id=state.id, completed=completed)
        failed = outcome if isinstance(outcome, StepFailed) else None
        return SagaRolledBack(
            saga_id=state.id,
            failed_step=move.step,
            error=move.error,
            completed=completed,
            failed=failed,
        )

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


def _of(saga_id: str, move: Run) -> dict[str, Any]:
    """The fields an attempt's events share: which saga, step, phase and attempt."""
    return {"saga_id": saga_id, "step": move.step, "phase": move.phase, "attempt": move.attempt}


def _now() -> datetime:
    return datetime.now(UTC)
