"""The agent registry: cards, registration events, heartbeats, and who is live (now or at T).

Where each part lives:
- registration is in the log: an instance appends `agent.registered` (with its card) and
  `agent.started` to the event stream `agent.<type>-<key>` when it starts, `agent.stopped` and
  `agent.deregistered` when it stops, so "which agents, at which versions, were live at T" is a
  fold of the `agent` category (`runs`, `live_at`);
- heartbeats are not: each instance publishes an `agent.heartbeat` payload every `heartbeat`
  seconds on `<prefix>.agents.<type>.<key>`, a subject of the liveness stream that keeps one
  message per subject, so the stream holds one entry per instance however long it runs
  (`read_liveness`). An instance that stops publishes a last one with `state: stopped`.

Status (of an instance, from its last heartbeat's server time and its own interval): healthy
within 2 intervals, stale within 5, down after that or once stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import msgspec
from nats.aio.client import Client

from newfuse.agents import wire
from newfuse.errors import FuseError
from newfuse.eventstore import ANY, EventFilter, EventStore
from newfuse.nats import headers
from newfuse.nats.direct import DirectGet
from newfuse.nats.provision import LivenessStreamSpec, ensure_event_stream
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    AgentCard,
    AgentDeregistered,
    AgentHeartbeat,
    AgentLifecycle,
    AgentRegistered,
    AgentStarted,
    AgentState,
    AgentStopped,
    AgentSubjects,
    NewEvent,
    ProtocolVersions,
    check_depth,
    utcnow,
)

if TYPE_CHECKING:
    from newfuse.agents.runtime import Agent

log = logging.getLogger("newfuse.agents")
L = TypeVar("L", bound=AgentLifecycle)

DEFAULT_HEARTBEAT: Final = 5.0
"""Seconds between an instance's heartbeats unless its Agent says otherwise."""
HEALTHY_BEATS: Final = 2
"""An instance whose last heartbeat is at most this many intervals old is healthy."""
STALE_BEATS: Final = 5
"""... at most this many, stale; older (or stopped), down."""
MAX_HEARTBEAT_BYTES: Final = 64 * 1024
"""A liveness entry longer than this is not a heartbeat we wrote: reported and skipped."""

Status = Literal["healthy", "stale", "down", "unknown"]
_RANK: Final[dict[str, int]] = {"healthy": 0, "stale": 1, "unknown": 2, "down": 3}
_HEARTBEAT: Final = msgspec.json.Decoder(AgentHeartbeat)
_ENCODER: Final = msgspec.json.Encoder()
_END_TYPES: Final = ("agent.stopped", "agent.deregistered", "agent.failed")
_RUN_TYPES: Final = ("agent.registered", "agent.started", *_END_TYPES)


def stream_of(agent_type: str, key: str) -> str:
    """The event stream of one instance's registration: `agent.<type>-<key>`."""
    return f"agent.{agent_type}-{key}"


def card_of(agent: Agent, subjects: Subjects, *, fast_path: bool = True) -> AgentCard:
    """The card of an agent type: its declared fields, the message types it handles, where it
    is reached, and (when it declares one) its message policy: what it accepts from whom."""
    return AgentCard(
        name=agent.name,
        description=agent.description,
        version=agent.version,
        provider=agent.provider,
        skills=list(agent.skills),
        capabilities=agent.capabilities,
        default_input_modes=["application/json"],
        default_output_modes=["application/json"],
        message_types=sorted(agent.routes),
        protocol_versions=ProtocolVersions(
            min=str(agent.protocols.lowest()), max=str(wire.current_protocol(agent.registry))
        ),
        protocol_range=str(agent.protocols),
        subjects=AgentSubjects(
            inbox=subjects.agent_type(agent.type),
            instance=subjects.agent_instance(agent.type, "<key>"),
            rpc=subjects.rpc(agent.type) if fast_path else None,
            topics=[subjects.topic(topic) for topic in agent.topics],
        ),
        accepts=agent.policy.as_card() if agent.policy is not None else None,
    )


def status_of(
    *, state: str | None, interval: float | None, last_seen: datetime, now: datetime
) -> Status:
    """healthy / stale / down from the last heartbeat (`interval`: the instance's own)."""
    if state == "stopped":
        return "down"
    beat = interval if interval and interval > 0 else DEFAULT_HEARTBEAT
    age = (now - last_seen).total_seconds()
    if age <= HEALTHY_BEATS * beat:
        return "healthy"
    if age <= STALE_BEATS * beat:
        return "stale"
    return "down"


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One agent instance as the liveness stream (or, with `--at`, the log) shows it."""

    agent_type: str
    key: str
    instance: str | None
    name: str
    version: str
    state: AgentState | None
    interval: float | None
    started: datetime | None
    last_seen: datetime | None
    status: Status


class AgentSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One row of `fuse agents list`: an agent type at one version, over its instances.

    `instances` counts those not down; `status` is the best of theirs (healthy over stale over
    down); `last_seen` the newest heartbeat.
    """

    id: str
    name: str
    version: str
    instances: int
    status: Status
    last_seen: datetime | None


def summarize(instances: Iterable[Instance]) -> list[AgentSummary]:
    """Instances grouped by agent type and version, sorted by type then version."""
    groups: dict[tuple[str, str], list[Instance]] = {}
    for one in instances:
        groups.setdefault((one.agent_type, one.version), []).append(one)
    rows = []
    for (agent_type, version), members in sorted(groups.items()):
        seen = [m.last_seen for m in members if m.last_seen is not None]
        newest = max(members, key=lambda m: m.last_seen or datetime.min.replace(tzinfo=UTC))
        rows.append(
            AgentSummary(
                id=agent_type,
                name=newest.name,
                version=version,
                instances=sum(1 for m in members if m.status != "down"),
                status=min((m.status for m in members), key=_RANK.__getitem__),
                last_seen=max(seen) if seen else None,
            )
        )
    return rows


def parse_server_time(text: str) -> datetime | None:
    """A `Nats-Time-Stamp` header (RFC 3339, nanoseconds) as an aware datetime; None if not."""
    text = text.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python takes at most microseconds
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def read_liveness(
    nc: Client,
    subjects: Subjects,
    *,
    now: datetime | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline per server answer
    on_invalid: Callable[[str], None] | None = None,
) -> list[Instance]:
    """Every instance the liveness stream remembers, with its status at `now` (default: now).

    `last_seen` is the server's store time of the instance's last heartbeat. An entry that is
    not a heartbeat (too long, too deep, wrong shape, a subject that names no instance) is
    reported to `on_invalid` (default: a warning) with its subject and sequence, and skipped.

    Raises:
        StoreNotFoundError: no liveness stream under this prefix (no agent ever ran there).
    """
    report = on_invalid or (lambda text: log.warning("agent registry: %s", text))
    await ensure_event_stream(
        nc, LivenessStreamSpec(subjects=subjects), timeout=timeout, create=False
    )
    moment = now or utcnow()
    direct = DirectGet(nc, subjects.liveness_stream_name, timeout=timeout)
    head = f"{subjects.prefix}.agents."
    found = []
    async for msg in direct.messages(subjects.all_liveness, "list agent instances"):
        meta = msg.headers or {}
        subject = meta.get(headers.SUBJECT, "")
        where = f"liveness entry {subject!r} (sequence {meta.get(headers.SEQUENCE, '?')})"
        agent_type, dot, key = subject.removeprefix(head).partition(".")
        if not subject.startswith(head) or not dot or not agent_type or not key or "." in key:
            report(f"{where}: the subject names no <type>.<key>; skipped")
            continue
        if len(msg.data) > MAX_HEARTBEAT_BYTES:
            report(f"{where}: {len(msg.data)} bytes, over {MAX_HEARTBEAT_BYTES}; skipped")
            continue
        try:
            check_depth(msg.data, where)
            beat = _HEARTBEAT.decode(msg.data)
        except (FuseError, msgspec.ValidationError, msgspec.DecodeError) as error:
            report(f"{where}: not an agent.heartbeat ({error}); skipped")
            continue
        seen = parse_server_time(meta.get(headers.TIME_STAMP, "")) or beat.timestamp
        found.append(
            Instance(
                agent_type=agent_type,
                key=key,
                instance=beat.instance,
                name=beat.name or agent_type,
                version=beat.version or "",
                state=beat.state,
                interval=beat.interval,
                started=beat.started,
                last_seen=seen,
                status=status_of(
                    state=beat.state, interval=beat.interval, last_seen=seen, now=moment
                ),
            )
        )
    return found


class Run(msgspec.Struct, kw_only=True):
    """One run of an instance, folded from its registration events in the log.

    `ended` is when the log says it ended (a stop, deregistration or failure, or the next
    registration of the same stream); None when the log does not say (it crashed, or runs).
    """

    stream: str
    agent_type: str
    key: str
    instance: str | None
    name: str
    version: str
    started: datetime
    ended: datetime | None = None


async def runs(store: EventStore) -> list[Run]:
    """Every run of every instance the log holds, in the order they started."""
    found: list[Run] = []
    current: dict[str, Run] = {}
    flt = EventFilter(categories=("agent",), types=_RUN_TYPES)
    async for event in store.read_all(filter=flt):
        data, stream, when = event.data, event.stream, event.envelope.timestamp
        if isinstance(data, AgentRegistered):
            previous = current.get(stream)
            if previous is not None and previous.ended is None:
                previous.ended = when  # a new registration ends the run before it
            card = data.card
            run = Run(
                stream=stream,
                agent_type=data.agent_type or stream.partition(".")[2],
                key=data.key or "",
                instance=data.instance,
                name=card.name if card is not None else (data.agent_type or ""),
                version=card.version if card is not None else "",
                started=when,
            )
            current[stream] = run
            found.append(run)
        elif event.type in _END_TYPES:
            run_now = current.get(stream)
            if run_now is not None and run_now.ended is None:
                if getattr(data, "instance", None) in (None, run_now.instance):
                    run_now.ended = when
    return found


def live_at(at: datetime, history: Iterable[Run], liveness: Iterable[Instance]) -> list[Instance]:
    """The instances live at `at`: started before it, not ended before it, and (for a run the
    log leaves open) a heartbeat no older than the stale bound at `at`.

    A run the log leaves open whose liveness entry is gone (expired, see LivenessStreamSpec)
    cannot be checked: it is listed with status `unknown`.
    """
    beats = {(i.agent_type, i.key, i.instance): i for i in liveness}
    live = []
    for run in history:
        if run.started > at or (run.ended is not None and run.ended <= at):
            continue
        status: Status = "healthy"
        last_seen: datetime | None = at
        beat = beats.get((run.agent_type, run.key, run.instance))
        if run.ended is None and beat is not None and beat.last_seen is not None:
            if beat.last_seen < at:
                status = status_of(
                    state=None, interval=beat.interval, last_seen=beat.last_seen, now=at
                )
                last_seen = beat.last_seen
            if beat.state == "stopped" and beat.last_seen <= at:
                status = "down"
        elif run.ended is None:
            status, last_seen = "unknown", None
        if status == "down":
            continue
        live.append(
            Instance(
                agent_type=run.agent_type,
                key=run.key,
                instance=run.instance,
                name=run.name,
                version=run.version,
                state="running",
                interval=beat.interval if beat is not None else None,
                started=run.started,
                last_seen=last_seen,
                status=status,
            )
        )
    return live


class Registration:
    """One instance's registration and heartbeats (what RunningAgent starts and stops)."""

    def __init__(
        self,
        nc: Client,
        store: EventStore,
        subjects: Subjects,
        *,
        agent: Agent,
        key: str,
        instance: str,
        card: AgentCard,
        publish: Callable[[str, bytes, dict[str, str]], Awaitable[None]],
    ) -> None:
        self._nc = nc
        self._store = store
        self._subjects = subjects
        self._agent = agent
        self._key = key
        self._instance = instance
        self._card = card
        self._publish = publish
        self._stream = stream_of(agent.type, key)
        self._subject = subjects.liveness(agent.type, key)
        self._started = utcnow()
        self._task: asyncio.Task[None] | None = None
        self.beats = 0
        """Heartbeats stored so far."""

    def _event(self, cls: type[L], **fields: Any) -> L:
        return cls(
            agent_id=f"{self._agent.type}-{self._key}",
            agent_type=self._agent.type,
            key=self._key,
            instance=self._instance,
            **fields,
        )

    async def start(self) -> None:
        """Register in the log, store the first heartbeat, then beat every interval."""
        await ensure_event_stream(self._nc, LivenessStreamSpec(subjects=self._subjects))
        registered = self._event(AgentRegistered, card=self._card)
        await self._store.append(self._stream, NewEvent(data=registered), ANY)
        await self._store.append(self._stream, NewEvent(data=self._event(AgentStarted)), ANY)
        await self.beat("running")
        self._task = asyncio.create_task(
            self._beating(), name=f"newfuse-heartbeat-{self._agent.type}-{self._key}"
        )

    async def beat(self, state: AgentState) -> None:
        """Store one heartbeat now (the liveness stream keeps only the last)."""
        beat = self._event(
            AgentHeartbeat,
            name=self._card.name,
            version=self._card.version,
            state=state,
            interval=self._agent.heartbeat,
            started=self._started,
        )
        wire = {headers.TYPE: "agent.heartbeat", headers.SCHEMA_VERSION: "1"}
        await self._publish(self._subject, _ENCODER.encode(beat), wire)
        self.beats += 1

    async def _beating(self) -> None:
        interval = self._agent.heartbeat
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(interval * HEALTHY_BEATS):
                    await self.beat("running")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the bus failed us: say so, try again next interval
                log.warning(
                    "agent %s/%s: heartbeat not stored: %s", self._agent.type, self._key, error
                )

    async def stop(self, reason: str | None = None) -> None:
        """Stop beating, store a last heartbeat saying stopped, deregister in the log. Failures
        are logged, never raised (stopping goes on)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.beat("stopped")
        except Exception as error:
            log.warning("agent %s/%s: last heartbeat not stored: %s", *self._who(), error)
        try:
            stopped = self._event(AgentStopped, reason=reason)
            await self._store.append(self._stream, NewEvent(data=stopped), ANY)
            gone = self._event(AgentDeregistered)
            await self._store.append(self._stream, NewEvent(data=gone), ANY)
        except Exception as error:
            log.warning("agent %s/%s: deregistration not stored: %s", *self._who(), error)

    def _who(self) -> tuple[str, str]:
        return self._agent.type, self._key
