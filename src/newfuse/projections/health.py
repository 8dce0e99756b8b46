"""Readiness of a projection process, and the one call that gives a process its health server,
Prometheus /metrics and OTLP export.

A runner is ready when its read model answers, it is not waiting out an outage, and the oldest
event it handles but has not applied is younger than `max_lag_seconds` (and, if set, fewer than
`max_lag_events` positions lie from that event to the head). Events the projection does not
handle never count as lag: the check scans forward from the checkpoint for the first one it
handles, and remembers how far it scanned, so each position is read at most once.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO

import msgspec

from newfuse.config import Settings
from newfuse.eventstore import EventFilter, EventStore
from newfuse.health import Check, HealthServer
from newfuse.projections.base import ANY_TYPE, Projection
from newfuse.projections.runner import ProjectionRunner
from newfuse.schemas import utcnow
from newfuse.telemetry import Telemetry


def store_check(store: EventStore) -> Check:
    """Ready while the store answers (a head-position request: NATS connected, stream there)."""

    async def check() -> str | None:
        await store.head_position()
        return None

    return check


class RunnerReadiness:
    """The readiness check of one runner (see the module docstring).

    Args:
        runner: the runner, in this process.
        max_lag_seconds: most age of the oldest unapplied event it handles.
        max_lag_events: most positions from that event to the head (None: no such limit).
    """

    def __init__(
        self,
        runner: ProjectionRunner[Any],
        *,
        max_lag_seconds: float = 30.0,
        max_lag_events: int | None = None,
    ) -> None:
        self.runner = runner
        self.max_lag_seconds = max_lag_seconds
        self.max_lag_events = max_lag_events
        self._scanned = 0  # no event the projection handles lies in (checkpoint, _scanned]
        self._handled = _handled_filter(runner.projection)

    async def __call__(self) -> str | None:
        runner = self.runner
        if runner.state != "running":
            return f"{runner.state}" + (f" ({runner.last_error})" if runner.last_error else "")
        await runner.model.active_generation(runner.name)  # the read model answers
        head = await runner.store.head_position()
        start = max(self._scanned, runner.checkpoint) + 1
        if start > head:
            return None
        pending = None
        async for event in runner.store.read_all(start, filter=self._handled, limit=1):
            pending = event
        if pending is None:
            self._scanned = head
            return None
        self._scanned = pending.position - 1
        age = max((utcnow() - pending.timestamp).total_seconds(), 0.0)
        behind = head - pending.position + 1
        if age > self.max_lag_seconds:
            return (
                f"behind by {age:.1f}s (position {pending.position} not applied; limit "
                f"{self.max_lag_seconds:g}s)"
            )
        if self.max_lag_events is not None and behind > self.max_lag_events:
            return (
                f"behind by {behind} events from position {pending.position} (limit "
                f"{self.max_lag_events})"
            )
        return None


def _handled_filter(projection: Projection[Any]) -> EventFilter:
    """The events `projection` applies: its filter narrowed to its handlers' types, unless it has
    a catch-all handler (the filter alone says nothing of types, so an event it ignores would
    otherwise count as lag until the runner's checkpoint passes it)."""
    if ANY_TYPE in projection.handlers:
        return projection.filter
    return msgspec.structs.replace(projection.filter, types=tuple(sorted(projection.handlers)))


def projection_checks(
    store: EventStore,
    runners: Sequence[ProjectionRunner[Any]],
    *,
    max_lag_seconds: float = 30.0,
    max_lag_events: int | None = None,
) -> dict[str, Check]:
    """Readiness checks of a projection process: `store`, then one per runner by its name."""
    checks: dict[str, Check] = {"store": store_check(store)}
    for runner in runners:
        checks[runner.name] = RunnerReadiness(
            runner, max_lag_seconds=max_lag_seconds, max_lag_events=max_lag_events
        )
    return checks


def add_health_option(parser: argparse.ArgumentParser) -> None:
    """The `--health HOST:PORT` option of a long-running command (what `operations` serves)."""
    parser.add_argument(
        "--health",
        metavar="HOST:PORT",
        help="serve /healthz, /readyz and /metrics there (port 0: a free one, printed; "
        "0.0.0.0:PORT for Kubernetes probes; default: $FUSE_HEALTH_ADDR, else off)",
    )


@contextlib.asynccontextmanager
async def operations(
    settings: Settings,
    store: EventStore,
    runners: Sequence[ProjectionRunner[Any]] = (),
    *,
    health: str | None = None,
    service_name: str = "newfuse",
    install: bool = True,
    out: TextIO | None = None,
) -> AsyncIterator[HealthServer | None]:
    """Health server and telemetry of a long-running process, for as long as the block runs.

    With a health address (`health`, else `settings.health_addr`) it serves /healthz, /readyz
    (the store and every runner, see `projection_checks`) and /metrics (every newfuse metric in
    Prometheus text) and prints its URL to `out` (stderr); with `settings.otlp_endpoint` spans
    and metrics are exported over OTLP/HTTP. With neither it does nothing.

    Args:
        settings: where health_addr and otlp_endpoint come from.
        store: the process's event store.
        runners: the projection runners whose readiness /readyz reports.
        health: a `host:port` that wins over `settings.health_addr` (the `--health` flag).
        service_name: the `service.name` of what is exported.
        install: make the providers the process's global ones, so everything that takes
            newfuse's default meter and tracer records into them (once per process).
        out: where the URL line goes.

    Raises:
        HealthServerError: the address cannot be bound.
    """
    address = health or settings.health_addr
    if address is None and settings.otlp_endpoint is None:
        yield None
        return
    telemetry = Telemetry(
        otlp_endpoint=settings.otlp_endpoint,
        prometheus=address is not None,
        service_name=service_name,
    )
    if install:
        telemetry.install()
    try:
        if address is None:
            yield None
            return
        server = HealthServer(
            address, checks=projection_checks(store, runners), metrics=telemetry.prometheus_text
        )
        async with await server.start():
            print(
                f"fuse: health on {server.url} (/healthz, /readyz, /metrics)",
                file=out or sys.stderr,
                flush=True,
            )
            yield server
    finally:
        await telemetry.close()
