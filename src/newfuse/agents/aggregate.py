"""Result aggregation: scatter one request to N agents, gather their replies by a strategy
(all, first, quorum of k, deadline), and store the aggregate as an event.

Every request of one aggregate carries the same context id and asks for a reply to the
client's reply subject; no request waits on a future: every reply comes to the aggregator's
`on_unclaimed_reply` callback, which routes it by `inReplyTo` (synchronously, on the event
loop) to the open aggregate or, once that closed, records it as late. So a reply is either
part of the aggregate or recorded as late, never neither.

On the message stream, at `<prefix>.a2a._aggregate.<aggregate id>`:
- `aggregate.closed`: the strategy, the outcome, each agent asked with its request id, who
  answered, who failed, who did not answer, and the event ids of the replies it was built from;
- `aggregate.late`: a reply that came after the close (the reply itself is stored on the
  message stream like every reply; this says which aggregate it was late for).

Both carry the context id as correlation id, so `fuse agents history --context <id>` shows the
requests, the replies (late ones too) and the aggregate's events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
from nats.aio.client import Client

from newfuse.agents import wire
from newfuse.agents.address import AgentId
from newfuse.agents.client import AgentClient, Reply
from newfuse.errors import AggregateConfigError, FuseError, InvalidEnvelopeError
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    AggregateClosed,
    AggregateLate,
    Asked,
    Envelope,
    Outcome,
    Strategy,
    new_event_id,
)

log = logging.getLogger(__name__)

SENDER: Final = "sender"
"""Envelope metadata key: who wrote an aggregate's event (the client's sender)."""

CLOSED_TYPE: Final = "aggregate.closed"
LATE_TYPE: Final = "aggregate.late"
STRATEGIES: Final[tuple[Strategy, ...]] = ("all", "first", "quorum", "deadline")

REMEMBERED_REQUESTS: Final = 100_000
"""Requests of closed aggregates remembered for late replies, at most (oldest forgotten
first); a late reply to a forgotten one is still on the message stream, just not marked."""


class Gathered(msgspec.Struct, frozen=True, kw_only=True):
    """What a scatter gathered.

    Attributes:
        aggregate_id, context_id, strategy, quorum, outcome: as in its `aggregate.closed`.
        replies: each agent whose reply was used, and the reply (in the order they came).
        failed: each agent that answered with an error (or could not be sent to), and why.
        missing: the agents that had not answered when it closed.
        event_id: the id of the `aggregate.closed` event.
        position: its position on the message stream.
    """

    aggregate_id: str
    context_id: str
    strategy: Strategy
    quorum: int | None
    outcome: Outcome
    replies: dict[str, Reply]
    failed: dict[str, str]
    missing: list[str]
    event_id: str
    position: int

    @property
    def complete(self) -> bool:
        """Whether the strategy was met."""
        return self.outcome == "complete"


class _Gather:
    """One open aggregate's state; fed by the reply callback, read by `scatter`."""

    def __init__(self, message_type: str, asked: dict[str, str]) -> None:
        self.message_type = message_type
        self.asked = asked  # request id -> agent
        self.replies: dict[str, Reply] = {}
        self.reply_ids: list[str] = []
        self.failed: dict[str, str] = {}
        self.failed_ids: list[str] = []
        self.changed = asyncio.Event()

    def arrived(self, request_id: str, reply: Reply) -> None:
        agent = self.asked[request_id]
        if agent in self.replies or agent in self.failed:
            return  # a second reply to one request: the first counts
        if reply.type == f"{self.message_type}.error":
            self.failed[agent] = str(reply.payload.get("error"))[:500]
            self.failed_ids.append(reply.event_id or "")
        else:
            self.replies[agent] = reply
            self.reply_ids.append(reply.event_id or "")
        self.changed.set()

    def missing(self) -> list[str]:
        return [a for a in self.asked.values() if a not in self.replies and a not in self.failed]


def _decided(strategy: Strategy, k: int, asked: int, ok: int, failed: int) -> Outcome | None:
    """The outcome once it is known before the deadline, else None (keep gathering)."""
    pending = asked - ok - failed
    if strategy == "deadline":
        if pending:
            return None
        return "complete" if ok == asked else ("partial" if ok else "incomplete")
    if ok >= k:
        return "complete"
    if ok + pending < k:  # the replies still to come cannot reach k
        return "incomplete"
    return None


def _at_deadline(strategy: Strategy, ok: int) -> Outcome:
    if strategy == "deadline":
        return "partial" if ok else "incomplete"
    return "incomplete"


class Aggregator:
    """Scatters requests through `client` and gathers the replies (an async context manager:
    entering starts listening for replies, leaving stops it after recording what is late).

    Attributes:
        late: late replies recorded so far.
    """

    def __init__(self, client: AgentClient, *, flush_timeout: float = 5.0) -> None:
        self.client = client
        self.subjects = client.subjects
        self.late = 0
        self._flush_timeout = flush_timeout
        self._open: dict[str, _Gather] = {}  # request id -> its open aggregate
        # request id of a closed aggregate -> (aggregate id, agent, context id, message type)
        self._closed: OrderedDict[str, tuple[str, str, str, str]] = OrderedDict()
        self._recording: set[asyncio.Task[None]] = set()
        self._stop: Callable[[], None] | None = None

    async def __aenter__(self) -> Aggregator:
        if self._stop is None:
            self._stop = self.client.on_unclaimed_reply(self._on_reply)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening; wait (at most `flush_timeout`) for late replies being recorded."""
        if self._stop is not None:
            self._stop()
            self._stop = None
        if self._recording:
            await asyncio.wait(set(self._recording), timeout=self._flush_timeout)

    def _on_reply(self, reply: Reply) -> None:
        request_id = reply.message.in_reply_to if reply.message is not None else None
        if not request_id:
            return
        gather = self._open.get(request_id)
        if gather is not None:
            gather.arrived(request_id, reply)
            return
        closed = self._closed.get(request_id)
        if closed is not None:
            task = asyncio.create_task(self._record_late(request_id, reply, *closed))
            self._recording.add(task)
            task.add_done_callback(self._recording.discard)

    async def _record_late(
        self,
        request_id: str,
        reply: Reply,
        aggregate_id: str,
        agent: str,
        context_id: str,
        message_type: str,
    ) -> None:
        reply_id = reply.event_id or ""
        failed = reply.type == f"{message_type}.error"
        event = AggregateLate(
            aggregate_id=aggregate_id,
            agent=agent,
            request_id=request_id,
            reply=reply_id,
            ok=not failed,
        )
        try:
            await self.client.record(
                self.subjects.aggregate(aggregate_id),
                f"aggregate.{aggregate_id}",
                LATE_TYPE,
                event,
                event_id=wire.derived_id(reply_id, "aggregate.late", aggregate_id),
                correlation_id=context_id,
                metadata={SENDER: self.client.sender},
            )
            self.late += 1
        except FuseError as error:
            log.warning(
                "aggregate %s: late reply %s not recorded: %s", aggregate_id, reply_id, error
            )

    async def scatter(
        self,
        agents: Sequence[AgentId | str],
        message_type: str,
        payload: Any = None,
        *,
        strategy: Strategy = "all",
        quorum: int | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - the aggregate's deadline
        context_id: str | None = None,
    ) -> Gathered:
        """Send `message_type` to every agent in `agents` and gather the replies.

        Strategies: `all` needs a reply from every agent, `first` one, `quorum` `quorum` of
        them; each closes as soon as it is met, or cannot be (too many failed), or at
        `timeout` (then `incomplete`). `deadline` gathers until every agent answered or
        `timeout` passed, and is `partial` when some answered. Failed replies (the agent gave
        up) count as answers, not as results. It never raises for what is missing: the
        outcome says it, in the result and in the stored `aggregate.closed`.

        Raises:
            AggregateConfigError: no agents, an agent twice, an unknown strategy, or a quorum
                that is missing or not within 1..len(agents).
        """
        names = [str(agent) for agent in agents]
        k = self._check(names, strategy, quorum)
        await self.__aenter__()  # listening for replies before the first request goes out
        aggregate_id = new_event_id()
        context = context_id or aggregate_id
        request_ids = {name: new_event_id() for name in names}
        gather = _Gather(message_type, {rid: name for name, rid in request_ids.items()})
        for rid in request_ids.values():
            self._open[rid] = gather
        deadline = time.monotonic() + timeout
        outcome: Outcome | None = None
        try:
            sent = await asyncio.gather(
                *(
                    self.client.send(
                        agent,
                        message_type,
                        payload,
                        message_id=request_ids[str(agent)],
                        context_id=context,
                        want_reply=True,
                    )
                    for agent in agents
                ),
                return_exceptions=True,
            )
            for name, result in zip(names, sent, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, FuseError):
                        raise result
                    gather.failed[name] = f"not sent: {result}"
            while True:
                outcome = _decided(strategy, k, len(names), len(gather.replies), len(gather.failed))
                left = deadline - time.monotonic()
                if outcome is not None or left <= 0:
                    break
                gather.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await gather.changed.wait()
        finally:
            # Closed here, with no await since the last look: a reply after this is late.
            for name, rid in request_ids.items():
                self._open.pop(rid, None)
                self._closed[rid] = (aggregate_id, name, context, message_type)
            while len(self._closed) > REMEMBERED_REQUESTS:
                self._closed.popitem(last=False)
        if outcome is None:
            outcome = _at_deadline(strategy, len(gather.replies))
        missing = gather.missing()
        closed = AggregateClosed(
            aggregate_id=aggregate_id,
            context_id=context,
            message_type=message_type,
            strategy=strategy,
            quorum=quorum if strategy == "quorum" else None,
            outcome=outcome,
            asked=[Asked(agent=name, request_id=rid) for name, rid in request_ids.items()],
            answered=list(gather.replies),
            failed=list(gather.failed),
            missing=missing,
            replies=[rid for rid in (*gather.reply_ids, *gather.failed_ids) if rid],
        )
        event_id = wire.derived_id(aggregate_id, "aggregate", "closed")
        ack = await self.client.record(
            self.subjects.aggregate(aggregate_id),
            f"aggregate.{aggregate_id}",
            CLOSED_TYPE,
            closed,
            event_id=event_id,
            correlation_id=context,
            metadata={SENDER: self.client.sender},
        )
        return Gathered(
            aggregate_id=aggregate_id,
            context_id=context,
            strategy=strategy,
            quorum=closed.quorum,
            outcome=outcome,
            replies=dict(gather.replies),
            failed=dict(gather.failed),
            missing=missing,
            event_id=event_id,
            position=ack.seq,
        )

    @staticmethod
    def _check(names: list[str], strategy: str, quorum: int | None) -> int:
        def refuse(field: str, value: object, reason: str) -> AggregateConfigError:
            return AggregateConfigError(field=field, value=value, reason=reason)

        if not names:
            raise refuse("agents", names, "scatter to at least one agent")
        if len(set(names)) != len(names):
            raise refuse("agents", names, "each agent once (a reply names its request)")
        if strategy not in STRATEGIES:
            raise refuse("strategy", strategy, f"one of {', '.join(STRATEGIES)}")
        if strategy == "quorum":
            if isinstance(quorum, bool) or not isinstance(quorum, int):
                raise refuse("quorum", quorum, "quorum needs a number of replies")
            if not 1 <= quorum <= len(names):
                raise refuse("quorum", quorum, f"must be within 1..{len(names)} (the agents)")
            return quorum
        if quorum is not None:
            raise refuse("quorum", quorum, f"only the quorum strategy takes one, not {strategy}")
        return {"all": len(names), "first": 1}.get(strategy, len(names))


class AggregateRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An aggregate as stored: its `aggregate.closed`, the late replies recorded after it, and
    what on its subject could not be read (position and why)."""

    aggregate_id: str
    closed: AggregateClosed | None
    closed_at: int | None
    late: list[AggregateLate]
    skipped: list[str]


class Aggregates:
    """Reads aggregates from the message stream of `prefix` (by direct get: nothing consumed,
    nothing written)."""

    def __init__(self, nc: Client, *, prefix: str = "fuse", timeout: float = 5.0) -> None:
        self.subjects = Subjects(prefix)
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=timeout)

    async def get(self, aggregate_id: str) -> AggregateRecord:
        """One aggregate's events (an empty record when nothing is stored for it).

        Raises:
            InvalidNameError: `aggregate_id` cannot be a subject token.
            StoreUnavailableError: the stream did not answer.
        """
        subject = self.subjects.aggregate(aggregate_id)
        closed: AggregateClosed | None = None
        closed_at: int | None = None
        late: list[AggregateLate] = []
        skipped: list[str] = []
        async for msg in self._direct.messages(subject, f"read aggregate {aggregate_id!r}"):
            position = sequence_of(msg)
            try:
                _, event = decode_aggregate_event(msg.data, position=position, subject=subject)
            except FuseError as error:
                skipped.append(f"position {position}: {error}")
                continue
            if isinstance(event, AggregateClosed) and closed is None:
                closed, closed_at = event, position
            elif isinstance(event, AggregateLate):
                late.append(event)
        return AggregateRecord(
            aggregate_id=aggregate_id,
            closed=closed,
            closed_at=closed_at,
            late=late,
            skipped=skipped,
        )


def decode_aggregate_event(
    body: bytes, *, position: int, subject: str
) -> tuple[Envelope, AggregateClosed | AggregateLate]:
    """One event of an aggregate's subject, checked (envelope, type, payload).

    Raises:
        InvalidEnvelopeError: it is not one (says where and why).
    """
    where = f"at position {position} on {subject}"
    envelope, payload = wire.decode_event(body, where, (CLOSED_TYPE, LATE_TYPE))
    if not isinstance(payload, AggregateClosed | AggregateLate):  # registered otherwise
        raise InvalidEnvelopeError(where=where, path="$.data", reason="not an aggregate event")
    return envelope, payload
