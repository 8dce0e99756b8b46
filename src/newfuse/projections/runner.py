"""The projection runner: subscribe from the checkpoint, apply events in batches, each batch and
its checkpoint in one atomic unit; poison events, read-model outages, rebuild, many runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Generic, Self

import msgspec
from opentelemetry import metrics, trace

from newfuse import reliability, telemetry
from newfuse.errors import (
    EventStoreError,
    FuseError,
    PartialBatchError,
    ProjectionError,
    ProjectionStoppedError,
    ProjectionTimeoutError,
    ReadModelUnavailableError,
)
from newfuse.eventstore import EventStore
from newfuse.projections.base import (
    B,
    BatchConflict,
    DeadLetter,
    DeferredWriteError,
    Projection,
    ReadModel,
    RunnerStats,
)
from newfuse.schemas import RecordedEvent, utcnow

log = logging.getLogger("newfuse.projections")

_OUTAGE_RETRY = reliability.RetryPolicy(first=0.05, most=2.0, deadline=None, jitter=0.0)
"""The wait between tries while the store or read model is unavailable (tried until stopped:
only `delay` is used, the attempts are the runner's own loop)."""


class _HandlerFailed(Exception):
    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _Applier(Generic[B]):
    """Applies events to one generation, tracking its checkpoint; shared by runner and rebuild."""

    def __init__(
        self,
        projection: Projection[B],
        model: ReadModel[B],
        generation: int,
        checkpoint: int,
        *,
        active: bool,
    ) -> None:
        self.projection = projection
        self.model = model
        self.generation = generation
        self.checkpoint = checkpoint
        self.active = active
        self.applied = 0
        self.dead_letters = 0

    def _batch(self) -> contextlib.AbstractAsyncContextManager[B]:
        return self.model.batch(
            self.projection.name, self.generation, self.checkpoint, active=self.active
        )

    async def apply(self, events: Sequence[RecordedEvent]) -> None:
        """Apply `events` (those above the checkpoint) in one batch; isolate a failing one.

        Raises:
            BatchConflict: the checkpoint or active generation moved; nothing was written.
            ReadModelUnavailableError: the model did not answer; the batch may or may not be in.
            ProjectionStoppedError: a poison event, and the projection stops on those.
        """
        events = [event for event in events if event.position > self.checkpoint]
        if not events:
            return
        try:
            async with self._batch() as batch:
                for index, event in enumerate(events):
                    try:
                        await self.projection.apply(event, batch)
                    except (DeferredWriteError, ReadModelUnavailableError):
                        # an earlier event's write flushed by this handler's statement, or the
                        # model is down (not this event's fault: wait and resume, skip nothing)
                        raise
                    except Exception as error:
                        raise _HandlerFailed(index, error) from error
                batch.advance(events[-1].position)
        except _HandlerFailed as failed:
            # Nothing of the batch was written: apply what came before the failing event, then
            # the event alone (retried), then the rest.
            await self.apply(events[: failed.index])
            await self._poison(events[failed.index], failed.error)
            await self.apply(events[failed.index + 1 :])
            return
        except DeferredWriteError as failed:
            # Nothing was written, and which event's deferred write failed is unknown: halve
            # the batch until the event is alone (log2(batch) extra batches, errors only).
            if len(events) == 1:
                await self._poison(events[0], failed.error)
                return
            middle = len(events) // 2
            await self.apply(events[:middle])
            await self.apply(events[middle:])
            return
        self.checkpoint = events[-1].position
        self.applied += len(events)

    async def _poison(self, event: RecordedEvent, error: Exception) -> None:
        retry = self.projection.retry
        failures = 1
        while failures < retry.attempts:
            await asyncio.sleep(retry.delay(failures))
            try:
                async with self._batch() as batch:
                    try:
                        await self.projection.apply(event, batch)
                    except ReadModelUnavailableError:
                        raise
                    except Exception as again:
                        raise _HandlerFailed(0, again) from again
                    batch.advance(event.position)
            except (_HandlerFailed, DeferredWriteError) as failed:
                error, failures = failed.error, failures + 1
                continue
            self.checkpoint = event.position
            self.applied += 1
            return
        letter = DeadLetter(
            projection=self.projection.name,
            position=event.position,
            event_id=event.id,
            event_type=event.type,
            stream=event.stream,
            error=_describe(error),
            attempts=failures,
            recorded_at=utcnow(),
        )
        log.warning(
            "projection %r: dead letter at position %d (%s): %s",
            self.projection.name,
            event.position,
            event.type,
            letter.error,
        )
        async with self._batch() as batch:
            batch.dead_letter(letter)
            if self.projection.on_poison == "skip":
                batch.advance(event.position)
        self.dead_letters += 1
        if self.projection.on_poison == "stop":
            raise ProjectionStoppedError(
                projection=self.projection.name,
                position=event.position,
                event_type=event.type,
                error=letter.error,
            )
        self.checkpoint = event.position


_MAX_LINKS = 32


def _links(events: Sequence[RecordedEvent]) -> list[trace.Link]:
    """Links from a batch's span to the traces of (up to 32 of) its events."""
    links: list[trace.Link] = []
    for event in events:
        if event.trace is None:
            continue
        parent = telemetry.context_from(event.trace.traceparent, event.trace.tracestate)
        span_context = trace.get_current_span(parent).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
            if len(links) == _MAX_LINKS:
                break
    return links


class _Wake:
    pass


_WAKE = _Wake()


class _Metrics:
    """The OpenTelemetry instruments of one runner (lag is a metric, not only a status field)."""

    def __init__(self, meter: metrics.Meter, name: str) -> None:
        self.attributes = {"projection": name}
        self.applied = meter.create_counter(
            "newfuse.projection.applied",
            unit="{event}",
            description="events applied and committed with the checkpoint",
        )
        self.dead_letters = meter.create_counter(
            "newfuse.projection.dead_letters",
            unit="{event}",
            description="events recorded as dead letters (handler failed every retry)",
        )
        self.errors = meter.create_counter(
            "newfuse.projection.errors",
            unit="{error}",
            description="outages of the store or read model the runner waited out, by error",
        )
        self.head = meter.create_gauge(
            "newfuse.store.head_position",
            unit="{position}",
            description="the event store's newest position, as the runner last measured it",
        )
        self.lag = meter.create_gauge(
            "newfuse.projection.lag",
            unit="{event}",
            description="events stored but not yet applied: head position minus checkpoint",
        )
        self.checkpoint = meter.create_gauge(
            "newfuse.projection.checkpoint",
            unit="{position}",
            description="last position applied to the projection's active generation",
        )
        self.rate = meter.create_gauge(
            "newfuse.projection.rate", unit="{event}/s", description="events applied per second"
        )

    def record(self, head: int, checkpoint: int, rate: float) -> None:
        self.head.set(head)
        self.lag.set(max(head - checkpoint, 0), self.attributes)
        self.checkpoint.set(checkpoint, self.attributes)
        self.rate.set(rate, self.attributes)


class ProjectionRunner(Generic[B]):
    """Keeps one projection's read model up to date with the event store.

    It subscribes from the active generation's checkpoint and applies what is available, up to
    `batch_size` events per atomic unit (model change + checkpoint). When the read model is
    unavailable it waits (with backoff) and resumes from the stored checkpoint; when a rebuild
    swaps generations, it moves to the new one.

    Example:
        async with ProjectionRunner(projection, store, model) as runner:
            result = await store.append("agent.a1", event)
            await runner.wait_until(result.position, timeout=5)

    Args:
        projection: what to apply.
        store: where events come from.
        model: where the projection's model, checkpoint and dead letters live.
        batch_size: most events per atomic unit.
        linger: seconds to wait for more events when fewer than `batch_size` are ready.
        stats_interval: seconds between reports of the runner's stats to the model (and of
            its gauges: `newfuse.projection.lag` in events, `newfuse.projection.checkpoint`,
            `newfuse.projection.rate` in events/s, `newfuse.store.head_position`). Counters
            move as it works: `newfuse.projection.applied`, `newfuse.projection.dead_letters`,
            `newfuse.projection.errors` (outages waited out, with an `error` attribute). All
            carry a `projection` attribute but the head.
        meter: OpenTelemetry meter for those metrics (default: newfuse's, from the global
            meter provider; a no-op until the application installs one).
        tracer: OpenTelemetry tracer of the `newfuse.projection.batch` span each batch gets
            (linked to the traces its events carry); default newfuse's, as for `meter`.
    """

    def __init__(
        self,
        projection: Projection[B],
        store: EventStore,
        model: ReadModel[B],
        *,
        batch_size: int = 500,
        linger: float = 0.002,
        stats_interval: float = 1.0,
        meter: metrics.Meter | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"projection {projection.name!r}: batch_size must be >= 1")
        self.projection = projection
        self.store = store
        self.model = model
        self.batch_size = batch_size
        self.linger = linger
        self.stats_interval = stats_interval
        self.state = "starting"
        self.last_error: str | None = None
        self.failure: ProjectionStoppedError | PartialBatchError | None = None
        self.events_per_second = 0.0
        self._applier: _Applier[B] | None = None
        self._checkpoint = 0
        self._applied = 0
        self._dead_letters = 0
        self._progress = asyncio.Event()
        self._stop = asyncio.Event()
        self._queue: asyncio.Queue[RecordedEvent | BaseException | _Wake] | None = None
        self._task: asyncio.Task[None] | None = None
        self._reported_at = time.monotonic()
        self._metrics = _Metrics(meter or telemetry.meter(), projection.name)
        self._tracer = tracer or telemetry.tracer()
        self._reporting: asyncio.Task[None] | None = None
        self._reported_applied = 0

    @property
    def name(self) -> str:
        """The projection's name."""
        return self.projection.name

    @property
    def checkpoint(self) -> int:
        """The last position applied (and committed) by this runner."""
        return self._checkpoint

    @property
    def generation(self) -> int | None:
        """The generation this runner writes to."""
        return self._applier.generation if self._applier else None

    @property
    def dead_letter_count(self) -> int:
        """Dead letters this runner recorded since it started."""
        return self._applier.dead_letters if self._applier else 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> Self:
        """Run in a background task owned by this runner (stop() ends it)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"projection {self.name}")
        return self

    def request_stop(self) -> None:
        """Ask the runner to stop after the batch it is applying (at a checkpoint)."""
        self._stop.set()
        if self._queue is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(_WAKE)

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a grace period
        """Stop at a checkpoint; cancel if that takes longer than `timeout`. Idempotent.

        A poison event or a partly applied Redis batch that stopped the runner is not raised
        here (see `failure`).
        """
        self.request_stop()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        error = task.exception()
        if error is not None and not isinstance(error, ProjectionStoppedError | PartialBatchError):
            raise error

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """Apply events until stopped (request_stop, stop, or cancellation).

        Raises:
            ProjectionStoppedError: a poison event stopped a projection declared `stop`.
        """
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    generation = await self.model.prepare(self.projection)
                    checkpoint = await self.model.checkpoint(self.name, generation)
                    self._applier = _Applier(
                        self.projection, self.model, generation, checkpoint, active=True
                    )
                    self._applied = self._dead_letters = 0  # counted per applier
                    self._set_checkpoint(checkpoint)
                    self._set_state("running")
                    await self._follow(self._applier)
                    failures = 0
                except BatchConflict as conflict:
                    log.info(
                        "projection %r: %s; resuming from the stored checkpoint",
                        self.name,
                        conflict,
                    )
                except (ReadModelUnavailableError, EventStoreError) as error:
                    if not getattr(error, "retryable", False):
                        raise
                    failures += 1
                    self._metrics.errors.add(
                        1, {**self._metrics.attributes, "error": type(error).__name__}
                    )
                    self.last_error = _describe(error)
                    self._set_state("waiting")
                    log.warning("projection %r: %s; retrying", self.name, error)
                    await self._pause(_OUTAGE_RETRY.delay(failures))
        except (ProjectionStoppedError, PartialBatchError) as error:
            self.last_error = str(error)
            self.state = "failed"
            with contextlib.suppress(Exception):
                await self._report(force=True)  # visible in status before wait_until raises
            self.failure = error
            raise
        except asyncio.CancelledError:
            self._set_state("stopped")
            raise
        except BaseException as error:
            self.last_error = _describe(error)
            self._set_state("failed")
            raise
        else:
            self._set_state("stopped")
        finally:
            self._progress.set()
            if self._reporting is not None:  # owned: never outlives the runner
                self._reporting.cancel()
                await asyncio.wait({self._reporting})
                self._reporting = None
            with contextlib.suppress(Exception):
                await asyncio.shield(self._report(force=True))

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()

    async def _read(
        self, queue: asyncio.Queue[RecordedEvent | BaseException | _Wake], start: int
    ) -> None:
        try:
            async with self.store.subscribe(
                self.projection.filter, start, name=f"projection {self.name}"
            ) as subscription:
                async for event in subscription:
                    await queue.put(event)
        except Exception as error:
            await queue.put(error)

    async def _follow(self, applier: _Applier[B]) -> None:
        queue: asyncio.Queue[RecordedEvent | BaseException | _Wake] = asyncio.Queue(
            maxsize=self.batch_size * 2
        )
        self._queue = queue
        reader = asyncio.create_task(self._read(queue, applier.checkpoint + 1))
        try:
            while not self._stop.is_set():
                batch: list[RecordedEvent] = []
                failure: BaseException | None = None
                item = await queue.get()
                while True:
                    if isinstance(item, BaseException):
                        failure = item
                        break
                    if isinstance(item, RecordedEvent):
                        batch.append(item)
                    if len(batch) >= self.batch_size:
                        break
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        if not batch or self.linger <= 0:
                            break
                        try:
                            async with asyncio.timeout(self.linger):
                                item = await queue.get()
                        except TimeoutError:
                            break
                if batch:
                    with self._tracer.start_as_current_span(
                        "newfuse.projection.batch",
                        kind=trace.SpanKind.CONSUMER,
                        links=_links(batch),
                        attributes={
                            "newfuse.projection": self.name,
                            "newfuse.position.first": batch[0].position,
                            "newfuse.position.last": batch[-1].position,
                            "newfuse.batch.size": len(batch),
                        },
                    ):
                        await applier.apply(batch)
                    self._committed(applier)
                if failure is not None:
                    raise failure
        finally:
            self._queue = None
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    def _set_checkpoint(self, checkpoint: int) -> None:
        self._checkpoint = checkpoint
        self._progress.set()
        self._progress = asyncio.Event()

    def _committed(self, applier: _Applier[B]) -> None:
        if applier.applied > self._applied:  # the counters take what is new since the last batch
            self._metrics.applied.add(applier.applied - self._applied, self._metrics.attributes)
        if applier.dead_letters > self._dead_letters:
            self._metrics.dead_letters.add(
                applier.dead_letters - self._dead_letters, self._metrics.attributes
            )
        self._applied, self._dead_letters = applier.applied, applier.dead_letters
        if applier.checkpoint != self._checkpoint:
            self._set_checkpoint(applier.checkpoint)
        idle = self._reporting is None or self._reporting.done()
        if idle and time.monotonic() - self._reported_at >= self.stats_interval:
            self._reporting = asyncio.get_running_loop().create_task(self._report())

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._progress.set()
            self._progress = asyncio.Event()

    def stats(self) -> RunnerStats:
        """What this runner reports about itself now."""
        return RunnerStats(
            state=self.state,
            events_per_second=round(self.events_per_second, 1),
            last_error=self.last_error,
            updated_at=utcnow(),
        )

    async def _report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._reported_at
        if not force and elapsed < self.stats_interval:
            return
        applied = self._applier.applied if self._applier else 0
        if elapsed > 0:
            self.events_per_second = max(applied - self._reported_applied, 0) / elapsed
        self._reported_at, self._reported_applied = now, applied
        try:
            await self.model.write_stats(self.name, self.stats())
        except ProjectionError as error:
            log.debug("projection %r: stats not reported: %s", self.name, error)
        try:
            head = await self.store.head_position()
        except FuseError as error:
            log.debug("projection %r: lag not measured: %s", self.name, error)
        else:
            self._metrics.record(head, self._checkpoint, self.events_per_second)

    # -- reading your own writes -------------------------------------------------------------------

    async def wait_until(self, position: int, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        """Wait until the checkpoint reaches `position` (an event this projection reads).

        Returns:
            The checkpoint reached.

        Raises:
            ProjectionTimeoutError: not reached within `timeout` seconds.
            ProjectionStoppedError: a poison event stopped the projection before it.
        """
        deadline = time.monotonic() + timeout
        while self._checkpoint < position:
            if self.failure is not None:
                raise self.failure
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProjectionTimeoutError(
                    projection=self.name,
                    position=position,
                    checkpoint=self._checkpoint,
                    timeout=timeout,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._progress.wait()
        return self._checkpoint


class RebuildProgress(msgspec.Struct, frozen=True, kw_only=True):
    """How far a rebuild is: the last position read, out of the head when the pass began."""

    projection: str
    generation: int
    position: int
    target: int
    applied: int
    swapped: bool = False


class RebuildResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a rebuild did: the generation it replaced, the new one, where the new one is."""

    projection: str
    old_generation: int
    new_generation: int
    checkpoint: int
    applied: int
    dead_letters: int


async def rebuild(
    projection: Projection[B],
    store: EventStore,
    model: ReadModel[B],
    *,
    progress: Callable[[RebuildProgress], None] | None = None,
    batch_size: int = 1000,
) -> RebuildResult:
    """Replay every event into a fresh generation while the old one keeps serving, swap the two
    atomically once the new one has caught up, then drop the old one.

    A runner of the projection may keep running meanwhile: it moves to the new generation on its
    own. Readers see either the old generation or the new one, never a mix.

    Args:
        projection: the projection to rebuild (its handlers may have changed).
        store: the event store to replay.
        model: the read model holding the projection.
        progress: called after each batch and once swapped.
        batch_size: events per atomic unit while replaying.

    Raises:
        RebuildConflictError: another rebuild swapped first; this one's generation is dropped.
        ProjectionStoppedError: a poison event, and the projection stops on those.
    """
    name = projection.name
    old = await model.prepare(projection)
    new = await model.new_generation(projection)
    applier = _Applier(projection, model, new, 0, active=False)
    seen = 0

    def report(target: int, swapped: bool = False) -> None:
        if progress is not None:
            progress(
                RebuildProgress(
                    projection=name,
                    generation=new,
                    position=seen,
                    target=target,
                    applied=applier.applied,
                    swapped=swapped,
                )
            )

    try:
        while True:
            target = await store.head_position()
            report(target)
            chunk: list[RecordedEvent] = []
            async for event in store.read_all(seen + 1, filter=projection.filter):
                chunk.append(event)
                if len(chunk) >= batch_size:
                    await applier.apply(chunk)
                    seen = chunk[-1].position
                    chunk = []
                    report(target)
            if chunk:
                await applier.apply(chunk)
                seen = chunk[-1].position
            seen = max(seen, target)
            report(target)
            if await model.swap(name, new, expected_active=old):
                break
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(model.drop_generation(name, new))
        raise
    report(seen, swapped=True)
    await model.drop_generation(name, old)
    return RebuildResult(
        projection=name,
        old_generation=old,
        new_generation=new,
        checkpoint=applier.checkpoint,
        applied=applier.applied,
        dead_letters=applier.dead_letters,
    )


class ProjectionGroup:
    """Runs several projection runners together, in one owned task group.

    SIGTERM and SIGINT (when `handle_signals`) ask every runner to stop at a checkpoint. A
    projection stopped by a poison event is logged and does not stop the others.
    """

    def __init__(self, runners: Sequence[ProjectionRunner[Any]]) -> None:
        self.runners = list(runners)

    def request_stop(self) -> None:
        """Ask every runner to stop after its current batch."""
        for runner in self.runners:
            runner.request_stop()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run every runner until all have stopped."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signum, self.request_stop)
                    installed.append(signum)
        try:
            async with asyncio.TaskGroup() as group:
                for runner in self.runners:
                    group.create_task(self._run_one(runner), name=f"projection {runner.name}")
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    async def _run_one(self, runner: ProjectionRunner[Any]) -> None:
        try:
            await runner.run()
        except (ProjectionStoppedError, PartialBatchError) as error:
            log.error("%s", error)
