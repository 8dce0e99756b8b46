"""Provisioning the JetStream stream of the events: create it once, never change it silently."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from nats.aio.client import Client

from newfuse.errors import StoreNotFoundError, StreamConfigError
from newfuse.nats.jsapi import (
    API,
    NANOSECONDS,
    api_error,
    api_request,
    nanoseconds,
    stream_create,
    stream_info,
)
from newfuse.nats.jserrors import (
    CLUSTER_NO_PEERS,
    STREAM_NAME_IN_USE,
    STREAM_NOT_FOUND,
    placement_error,
    stream_create_error,
)
from newfuse.nats.subjects import Subjects

log = logging.getLogger("newfuse.nats")


class EventStreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the events' JetStream stream must look like.

    Attributes:
        subjects: where the names come from (stream name and its one subject, `<prefix>.ev.>`).
        replicas: copies in a cluster when the stream is created; None chooses by the servers
            (`default_replicas`). An existing stream keeps the count it has.
        max_age: seconds to keep events; None keeps them forever.
        max_bytes: size limit of the stream; None for no limit.
        duplicate_window: seconds during which a repeated `Nats-Msg-Id` is dropped.
    """

    subjects: Subjects
    replicas: int | None = None
    max_age: float | None = None
    max_bytes: int | None = None
    duplicate_window: float = 120.0

    def config(self, *, atomic: bool, replicas: int = 1) -> dict[str, Any]:
        """The JetStream API stream configuration (durations in nanoseconds); `replicas` is
        used when the spec leaves the count open."""
        config: dict[str, Any] = {
            "name": self.subjects.stream_name,
            "subjects": [self.subjects.all_events],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.replicas or replicas,
            "max_age": nanoseconds(self.max_age or 0),
            "max_bytes": -1 if self.max_bytes is None else self.max_bytes,
            "max_msgs": -1,
            "max_msgs_per_subject": -1,
            "duplicate_window": nanoseconds(self.duplicate_window),
            "discard": "old",
            "allow_direct": True,
            "description": "newfuse events (one subject per event stream)",
        }
        if atomic:
            config["allow_atomic"] = True  # ADR-50, nats-server >= 2.12
        return config


class MessageStreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the A2A messages' stream must look like (inboxes, topics, replies, task queues).

    Writers publish with `Nats-Msg-Id` and no expected-sequence header, so many senders to one
    agent never serialize on a version check; order is the JetStream sequence. `replicas`
    None chooses by the servers, as for the events' stream.
    """

    subjects: Subjects
    replicas: int | None = None
    max_age: float | None = None
    duplicate_window: float = 120.0

    def config(self, *, atomic: bool, replicas: int = 1) -> dict[str, Any]:
        """The JetStream API stream configuration (durations in nanoseconds)."""
        return {  # no atomic batches (`atomic` is ignored): see agents/runtime.py for why
            "name": self.subjects.message_stream_name,
            "subjects": list(self.subjects.all_messages),
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.replicas or replicas,
            "max_age": nanoseconds(self.max_age or 0),
            "max_bytes": -1,
            "max_msgs": -1,
            "max_msgs_per_subject": -1,
            "duplicate_window": nanoseconds(self.duplicate_window),
            "discard": "old",
            "allow_direct": True,
            "description": "newfuse A2A messages and task queues",
        }


class LivenessStreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the agents' liveness stream must look like: the last heartbeat of each instance.

    One subject per instance (`<prefix>.agents.<type>.<key>`) and one message per subject, so it
    holds as many messages as there are instances, however long they run; `max_age` (seconds,
    default a week) drops the entries of instances that stopped beating that long ago.
    """

    subjects: Subjects
    replicas: int | None = None
    max_age: float = 7 * 24 * 3600.0

    def config(self, *, atomic: bool, replicas: int = 1) -> dict[str, Any]:
        """The JetStream API stream configuration (durations in nanoseconds)."""
        return {
            "name": self.subjects.liveness_stream_name,
            "subjects": [self.subjects.all_liveness],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.replicas or replicas,
            "max_age": nanoseconds(self.max_age),
            "max_bytes": -1,
            "max_msgs": -1,
            "max_msgs_per_subject": 1,
            "duplicate_window": nanoseconds(min(self.max_age, 120.0)),
            "discard": "old",
            "allow_direct": True,
            "description": "newfuse agents: the last heartbeat of each instance",
        }


class TimerStreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the timers' stream must look like (core/timers.py): message schedules (ADR-51) on
    `<prefix>.timer.at.<namespace>.<key>`, fired into `<prefix>.timer.fired.<namespace>.<key>`.

    One message per subject: setting a timer again replaces its schedule, and a key keeps only
    its last fire, so the stream holds at most two messages per key however often it is set;
    fires also expire (`Nats-Schedule-TTL`, hence allow_msg_ttl). No age limit: it would drop
    schedules set far ahead. Messages are small (`max_msg_size`): a timer carries a wake-up,
    not data.
    """

    subjects: Subjects
    replicas: int | None = None
    max_msg_size: int = 8192

    def config(self, *, atomic: bool, replicas: int = 1) -> dict[str, Any]:
        """The JetStream API stream configuration (`atomic` is ignored: no batches here)."""
        return {
            "name": self.subjects.timer_stream_name,
            "subjects": [self.subjects.all_timers],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.replicas or replicas,
            "max_age": 0,
            "max_bytes": -1,
            "max_msgs": -1,
            "max_msgs_per_subject": 1,
            "max_msg_size": self.max_msg_size,
            "duplicate_window": nanoseconds(120.0),
            "discard": "old",
            "allow_msg_schedules": True,  # ADR-51, nats-server >= 2.12
            "allow_msg_ttl": True,  # ADR-43, nats-server >= 2.11
            "description": "newfuse timers: schedules (ADR-51) and their fires",
        }


class StreamState(msgspec.Struct, frozen=True, kw_only=True):
    """What provisioning found out: the stream's name, whether it can take atomic batches, and
    how many copies it keeps."""

    name: str
    atomic: bool
    server_version: str
    replicas: int = 1


def cluster_nodes(nc: Client) -> int | None:
    """How many servers the server `nc` is connected to has in its cluster: 1 when it is not
    clustered, else the client URLs it advertises (every routed server's, its own included);
    None when a cluster hides them (`no_advertise`)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    return len(set(info.get("connect_urls") or ())) or None


def default_replicas(nodes: int | None) -> int:
    """The replica count a store picks itself: 3 where there are 3 or more nodes (a majority
    survives the loss of one) or their number is hidden, else every node."""
    return 3 if nodes is None else min(3, nodes)


def server_version(nc: Client) -> str:
    """The version of the server `nc` is connected to, e.g. `2.15.1` ("" when unknown)."""
    found = nc.connected_server_version
    try:
        return f"{found.major}.{found.minor}.{found.patch}"
    except (ValueError, TypeError):
        return ""


def server_supports_atomic(version: str) -> bool:
    """True if a nats-server version string is 2.12 or newer (atomic batch publish, ADR-50)."""
    try:
        major, minor = (int(part) for part in version.split("-", 1)[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 12)


def server_supports_schedules(version: str) -> bool:
    """True if a nats-server version string is 2.12 or newer (message scheduling with `@at`,
    ADR-51; older servers store a `Nats-Schedule` message as a plain one and never fire it)."""
    return server_supports_atomic(version)  # both came with 2.12


async def event_prefixes(
    nc: Client,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline per JetStream API answer
) -> list[str]:
    """The prefixes that have an events' stream on this server (`<prefix>.ev.>`), sorted."""
    found: set[str] = set()
    offset = 0
    while True:
        page = await api_request(
            nc,
            f"{API}.STREAM.LIST",
            {"offset": offset},
            timeout=timeout,
            operation="list the event streams",
        )
        streams = page.get("streams") or []
        for stream in streams:
            for subject in stream.get("config", {}).get("subjects") or ():
                prefix, dot, rest = subject.partition(".")
                if dot and rest == "ev.>":
                    found.add(prefix)
        offset += len(streams)
        if not streams or offset >= page.get("total", 0):
            return sorted(found)


async def ensure_event_stream(
    nc: Client,
    spec: EventStreamSpec | MessageStreamSpec | LivenessStreamSpec | TimerStreamSpec,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline per JetStream API answer
    create: bool = True,
) -> StreamState:
    """Create the events' (or the messages') stream if missing; check it if it exists. Idempotent.

    Args:
        nc: a connected client.
        spec: the wanted configuration.
        timeout: seconds per JetStream API call.
        create: create the stream when it is missing; False (for readers) raises instead.

    Returns:
        The stream's name, whether atomic batches are available, and the server version.

    Raises:
        StreamConfigError: the stream exists with a configuration newfuse cannot use (it names
            the field, the wanted and the actual value); the stream is never updated.
        StreamCreateError: JetStream refused to create the stream (replicas > 1 on a single
            server, not enough storage, ...); it says what to change. Its subclass
            StreamCreateUnavailableError (retryable) is for a cluster that is not ready.
        StoreUnavailableError: JetStream did not answer.
        StoreNotFoundError: with `create=False`, there is no such stream; it names the stream
            and the prefixes that have one.
    """
    version = server_version(nc)
    atomic = server_supports_atomic(version)
    nodes = cluster_nodes(nc)
    replicas = spec.replicas or default_replicas(nodes)
    wanted = spec.config(atomic=atomic, replicas=replicas)
    name: str = wanted["name"]
    operation = f"provision stream {name!r}"
    info = await stream_info(nc, name, timeout=timeout, operation=operation)
    error = api_error(info)
    if error is not None and error.err_code == STREAM_NOT_FOUND and not create:
        raise StoreNotFoundError(
            where=f"JetStream stream {name} (prefix {spec.subjects.prefix!r})",
            existing=[f"prefix {p!r}" for p in await event_prefixes(nc, timeout=timeout)],
            hint="give one of those prefixes (--prefix or FUSE_PREFIX); a stream is created "
            "by the first append (fuse publish), never by a command that only reads",
        )
    if error is not None and error.err_code == STREAM_NOT_FOUND:
        if nodes is not None and 1 < nodes < replicas:  # one server answers this itself
            raise placement_error(name, replicas=replicas, nodes=nodes)
        info = await stream_create(nc, wanted, timeout=timeout, operation=operation)
        error = api_error(info)
        if error is not None and error.err_code == STREAM_NAME_IN_USE:
            # Someone created it between our two calls: check theirs like any existing stream.
            info = await stream_info(nc, name, timeout=timeout, operation=operation)
            error = api_error(info)
        elif error is None:
            log.info(
                "created JetStream stream %s on %s with %d replica(s) (%s; %s node(s) seen)",
                name,
                wanted["subjects"],
                replicas,
                "as asked" if spec.replicas else "chosen: FUSE_REPLICAS / replicas= to change",
                nodes or "unknown",
            )
        elif error.err_code == CLUSTER_NO_PEERS and nodes is not None and replicas > nodes:
            raise placement_error(name, replicas=replicas, nodes=nodes)
    if error is not None:  # the create was refused, or the look-up failed: not a config mismatch
        raise stream_create_error(name, error)
    actual: dict[str, Any] = info["config"]
    have = int(actual.get("num_replicas") or 1)
    if spec.replicas is not None and spec.replicas != have:
        log.warning(
            "JetStream stream %s keeps %d replica(s), not the %d asked for: an existing stream "
            "is used as it is (change it with `nats stream edit --replicas`)",
            name,
            have,
            spec.replicas,
        )
    wanted["num_replicas"] = have  # the count is the stream's; every other setting is checked
    checked = (
        _CHECKED
        if isinstance(spec, EventStreamSpec)
        else _LIVENESS_CHECKED
        if isinstance(spec, LivenessStreamSpec)
        else _TIMERS_CHECKED
        if isinstance(spec, TimerStreamSpec)
        else _MESSAGES_CHECKED
    )
    _check(name, wanted, actual, atomic=atomic, checked=checked)
    return StreamState(
        name=name,
        atomic=atomic and bool(actual.get("allow_atomic")),
        server_version=version,
        replicas=have,
    )


_DEFAULTS: dict[str, Any] = {
    "retention": "limits",
    "max_age": 0,
    "max_bytes": -1,
    "max_msgs": -1,
    "max_msgs_per_subject": -1,
    "allow_direct": False,
    "allow_atomic": False,
    "allow_msg_schedules": False,
    "allow_msg_ttl": False,
    "num_replicas": 1,
}
_CHECKED = (
    "subjects",
    "retention",
    "storage",
    "num_replicas",
    "max_age",
    "max_bytes",
    "max_msgs",
    "max_msgs_per_subject",
    "duplicate_window",
    "allow_direct",
    "allow_atomic",
)


_MESSAGES_CHECKED = ("subjects", "retention", "storage", "allow_direct")
"""What the agent runtime relies on in the message stream; its age limit and duplicate window
are the operator's to choose (exactly-once effects do not depend on the window)."""


_LIVENESS_CHECKED = ("subjects", "max_msgs_per_subject", "allow_direct")
"""What listing agents relies on in the liveness stream: one message per instance, direct gets."""


_TIMERS_CHECKED = (
    "subjects",
    "retention",
    "max_msgs_per_subject",
    "allow_msg_schedules",
    "allow_msg_ttl",
)
"""What timers rely on: schedules allowed, a key's schedule replaced by the next, fires' TTLs."""


def _check(
    name: str,
    wanted: dict[str, Any],
    actual: dict[str, Any],
    *,
    atomic: bool,
    checked: tuple[str, ...],
) -> None:
    for field in checked:
        if field == "allow_atomic" and not atomic:
            continue  # an older server: multi-event appends are refused instead
        want: Any = wanted.get(field, _DEFAULTS.get(field))
        have: Any = actual.get(field, _DEFAULTS.get(field))
        if want != have:
            if field in ("max_age", "duplicate_window") and have is not None:  # nanoseconds
                field, want, have = f"{field} (seconds)", want / NANOSECONDS, have / NANOSECONDS
            raise StreamConfigError(stream=name, field=field, wanted=want, actual=have)
