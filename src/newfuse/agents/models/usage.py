"""What model calls cost, from the log: the `model.invoked` records read back and summed.

`ModelCalls` reads the records on `<prefix>.a2a._model.*` by direct get (nothing consumed,
nothing written); a body that is not a valid record is listed in `skipped` with its position,
never raised. `usage` sums calls, errors, tokens and latency per agent type and model
version (provider, model asked for, model that answered, revision).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime

import msgspec
from nats.aio.client import Client

from newfuse.agents.address import check_agent_name
from newfuse.agents.models.recording import StoredInvocation, decode_invoked
from newfuse.errors import FuseError
from newfuse.nats import headers
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.subjects import Subjects


class Usage(msgspec.Struct, kw_only=True):
    """The calls of one agent type to one model version.

    Attributes:
        agent: the agent type (or the recorder's source) that made the calls.
        provider, request_model, response_model, revision: the model version.
        calls, errors: how many calls, and how many of them failed.
        input_tokens, output_tokens: summed over the calls that reported them.
        latency_ms: summed latency; `mean_latency_ms` per call.
        first, last: when the first and the last call were recorded.
    """

    agent: str
    provider: str
    request_model: str
    response_model: str | None
    revision: str | None
    calls: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0
    first: datetime | None = None
    last: datetime | None = None

    @property
    def mean_latency_ms(self) -> float:
        return self.latency_ms / self.calls if self.calls else 0.0


def agent_type_of(stored: StoredInvocation) -> str:
    """The agent type of a record (`type/key` cut at the slash; a recorder's source)."""
    agent = stored.invoked.agent or stored.envelope.stream.partition(".")[2]
    return agent.partition("/")[0]


class ModelCalls:
    """Reads the model call records stored under `prefix` (never writes).

    `skipped` lists what the last `records` could not read (position and why).
    """

    def __init__(self, nc: Client, *, prefix: str = "fuse", timeout: float = 5.0) -> None:
        self.subjects = Subjects(prefix)
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=timeout)
        self.skipped: list[str] = []

    async def records(
        self,
        *,
        agent: str | None = None,
        context_id: str | None = None,
        since: datetime | None = None,
        start: int = 1,
    ) -> AsyncIterator[StoredInvocation]:
        """Every record from position `start` on, oldest first; only agent type `agent`'s,
        conversation `context_id`'s, or those stored at or after `since` when given.

        Raises:
            StoreUnavailableError, ElectionTimeoutError: the stream did not answer.
        """
        self.skipped = []
        subject = self.subjects.all_models
        if agent is not None:
            subject = self.subjects.models(check_agent_name(agent, kind="agent type"))
        async for msg in self._direct.messages(subject, "read model call records", start):
            where = (msg.headers or {}).get(headers.SUBJECT, subject)
            try:
                stored = decode_invoked(msg.data, position=sequence_of(msg), subject=where)
            except FuseError as error:
                self.skipped.append(f"position {sequence_of(msg)} on {where}: {error}")
                continue
            if context_id is not None and stored.invoked.context_id != context_id:
                continue
            if since is not None and stored.envelope.timestamp < since:
                continue
            yield stored


def usage(records: Iterable[StoredInvocation]) -> list[Usage]:
    """The records summed per agent type and model version, sorted by agent then model."""
    rows: dict[tuple[str, str, str, str | None, str | None], Usage] = {}
    for stored in records:
        invoked = stored.invoked
        key = (
            agent_type_of(stored),
            invoked.provider,
            invoked.request_model,
            invoked.response_model,
            invoked.revision,
        )
        row = rows.get(key)
        if row is None:
            row = rows[key] = Usage(
                agent=key[0],
                provider=key[1],
                request_model=key[2],
                response_model=key[3],
                revision=key[4],
            )
        row.calls += 1
        row.errors += invoked.outcome != "ok"
        row.input_tokens += invoked.input_tokens or 0
        row.output_tokens += invoked.output_tokens or 0
        row.latency_ms += invoked.latency_ms
        when = stored.envelope.timestamp
        row.first = when if row.first is None else min(row.first, when)
        row.last = when if row.last is None else max(row.last, when)
    return sorted(
        rows.values(),
        key=lambda r: (
            r.agent,
            r.provider,
            r.request_model,
            r.response_model or "",
            r.revision or "",
        ),
    )
