"""A NATS micro service (ADR-32) whose endpoints are subscriptions someone else owns.

Each running agent is one: it answers `$SRV.PING|INFO|STATS`, `$SRV.<verb>.<name>` and
`$SRV.<verb>.<name>.<id>` so standard tooling (`nats micro ls`) discovers it. nats-py ships
`nats.micro`, but its endpoints make their own subscriptions (the agent's fast path already has
one, with its own reply rules), it reports `last_error` as null where ADR-32 wants a string,
and resetting it breaks the stats' average; so this module keeps only the discovery side and
lets the owner of a subscription record each request's outcome.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from newfuse.errors import MicroServiceConfigError

SRV_PREFIX: Final = "$SRV"
PING_RESPONSE: Final = "io.nats.micro.v1.ping_response"
INFO_RESPONSE: Final = "io.nats.micro.v1.info_response"
STATS_RESPONSE: Final = "io.nats.micro.v1.stats_response"
ERROR_HEADER: Final = "Nats-Service-Error"
"""ADR-32: a reply that is an error says so in this header (a description for people)."""
ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
"""ADR-32: and its code in this one (always a number)."""

NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
"""ADR-32: service and endpoint names."""
SEMVER_RE: Final = re.compile(  # the regular expression semver.org suggests
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_VERBS: Final = ("PING", "INFO", "STATS")
_ENCODER: Final = msgspec.json.Encoder()


def service_name(text: str) -> str:
    """`text` as an ADR-32 name: each character outside `A-Z a-z 0-9 _ -` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


class EndpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str]


class EndpointStats(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    subject: str
    queue_group: str
    num_requests: int
    num_errors: int
    last_error: str
    processing_time: int
    average_processing_time: int


class PingResponse(msgspec.Struct, frozen=True, kw_only=True):
    """ADR-32's standard fields, which every answer starts with (and all PING has)."""

    type: str = PING_RESPONSE
    name: str
    id: str
    version: str
    metadata: dict[str, str]


class InfoResponse(PingResponse, frozen=True, kw_only=True):
    type: str = INFO_RESPONSE
    description: str
    endpoints: list[EndpointInfo]


class StatsResponse(PingResponse, frozen=True, kw_only=True):
    type: str = STATS_RESPONSE
    started: str
    endpoints: list[EndpointStats]


class Endpoint:
    """One endpoint: where it listens and what it has seen (`record` after each request)."""

    def __init__(
        self, *, name: str, subject: str, queue_group: str, metadata: dict[str, str]
    ) -> None:
        self.name = name
        self.subject = subject
        self.queue_group = queue_group
        self.metadata = metadata
        self.num_requests = 0
        self.num_errors = 0
        self.last_error = ""
        self.processing_time = 0

    def record(self, elapsed_ns: int, error: str | None = None) -> None:
        """Count one request that took `elapsed_ns` nanoseconds; `error` if it failed."""
        self.num_requests += 1
        self.processing_time += max(elapsed_ns, 0)
        if error is not None:
            self.num_errors += 1
            self.last_error = error

    def info(self) -> EndpointInfo:
        return EndpointInfo(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group,
            metadata=self.metadata,
        )

    def stats(self) -> EndpointStats:
        average = self.processing_time // self.num_requests if self.num_requests else 0
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group,
            num_requests=self.num_requests,
            num_errors=self.num_errors,
            last_error=self.last_error,
            processing_time=self.processing_time,
            average_processing_time=average,
        )


class MicroService:
    """The discovery side of an ADR-32 service on `nc`; an async context manager.

    Args:
        nc: a connected client.
        name: the service's kind (ADR-32: `A-Z a-z 0-9 _ -`).
        version: a semantic version.
        description: for people.
        metadata: free-form strings about this instance (immutable once started).
        service_id: this instance's id (default: a random one).
        prefix: the discovery subjects' first token (ADR-32 lets it be overridden).

    Raises:
        MicroServiceConfigError: the name or version is not what ADR-32 requires.
    """

    def __init__(
        self,
        nc: Client,
        *,
        name: str,
        version: str,
        description: str = "",
        metadata: dict[str, str] | None = None,
        service_id: str | None = None,
        prefix: str = SRV_PREFIX,
    ) -> None:
        if not NAME_RE.match(name):
            raise MicroServiceConfigError(
                field="name", value=name, reason="ADR-32 names have only A-Z, a-z, 0-9, _ and -"
            )
        if not SEMVER_RE.match(version):
            raise MicroServiceConfigError(
                field="version", value=version, reason="ADR-32 wants a semantic version (1.2.3)"
            )
        self.name = name
        self.version = version
        self.description = description
        self.metadata = dict(metadata or {})
        self.id = service_id or uuid.uuid4().hex
        self.prefix = prefix
        self.endpoints: list[Endpoint] = []
        self.started = datetime.now(UTC)
        self._nc = nc
        self._subscriptions: list[Subscription] = []

    def add_endpoint(
        self,
        name: str,
        *,
        subject: str,
        queue_group: str,
        metadata: dict[str, str] | None = None,
    ) -> Endpoint:
        """Declare an endpoint served by a subscription the caller owns; returns its counters."""
        if not NAME_RE.match(name):
            raise MicroServiceConfigError(
                field="endpoint name",
                value=name,
                reason="ADR-32 names have only A-Z, a-z, 0-9, _ and -",
            )
        endpoint = Endpoint(
            name=name, subject=subject, queue_group=queue_group, metadata=dict(metadata or {})
        )
        self.endpoints.append(endpoint)
        return endpoint

    def subjects(self, verb: str) -> tuple[str, str, str]:
        """The three subjects this service answers `verb` on: all, its name, name and id."""
        base = f"{self.prefix}.{verb}"
        return base, f"{base}.{self.name}", f"{base}.{self.name}.{self.id}"

    def ping(self) -> PingResponse:
        return PingResponse(
            name=self.name, id=self.id, version=self.version, metadata=self.metadata
        )

    def info(self) -> InfoResponse:
        return InfoResponse(
            name=self.name,
            id=self.id,
            version=self.version,
            metadata=self.metadata,
            description=self.description,
            endpoints=[endpoint.info() for endpoint in self.endpoints],
        )

    def stats(self) -> StatsResponse:
        started = self.started.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        return StatsResponse(
            name=self.name,
            id=self.id,
            version=self.version,
            metadata=self.metadata,
            started=started,
            endpoints=[endpoint.stats() for endpoint in self.endpoints],
        )

    async def start(self) -> None:
        """Answer the discovery requests (idempotent)."""
        if self._subscriptions:
            return
        self.started = datetime.now(UTC)
        answers: dict[str, Callable[[], msgspec.Struct]] = {
            "PING": self.ping,
            "INFO": self.info,
            "STATS": self.stats,
        }
        for verb in _VERBS:
            answer = answers[verb]

            async def respond(msg: Msg, answer: Callable[[], msgspec.Struct] = answer) -> None:
                if not msg.reply:
                    return  # a publish, not a request: nothing to answer
                with contextlib.suppress(Exception):  # the asker may be gone
                    await msg.respond(_ENCODER.encode(answer()))

            for subject in self.subjects(verb):
                self._subscriptions.append(await self._nc.subscribe(subject, cb=respond))

    async def stop(self) -> None:
        """Stop answering (idempotent)."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def __aenter__(self) -> MicroService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
