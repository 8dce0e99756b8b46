"""The JetStream event store (the default backend): one JetStream stream, one subject per stream.

Every event stream `<category>.<id>` is the subject `<prefix>.ev.<category>.<id>` of one
JetStream stream (`<PREFIX>_EVENTS`). The global position of an event is its JetStream sequence;
its version within its stream is in the body (authoritative) and in the `Fuse-Stream-Version`
header. Optimistic concurrency is checked by the server: every append carries
`Nats-Expected-Last-Subject-Sequence` = the sequence of the subject's last message (which may be
a foreign one), while the version is the last *valid* event's plus one. The store keeps both in
a bounded cache (stream -> version, last sequence, clean) and brings it up to date by reading
the subject's messages after the cached sequence (all of them on a miss) with batched direct
gets, checking each by the wire rule; usually that is one request that finds nothing new.
Several events in one append are one atomic batch (ADR-50). Reads of one stream use batched direct
gets (`newfuse.nats.direct`); `read_all` and `subscribe` use an ordered push consumer
(`newfuse.nats.ordered`), which recreates itself from the last delivered position after a gap, a
reconnect or a server restart: for as long as it takes behind `subscribe`, for the store's
`timeout` behind a finite `read_all` (then ReadInterruptedError names the position reached).
`close()` ends the feeds still open (StoreClosedError), deletes their consumers, and fails appends
waiting for an acknowledgement.

On a connection that trusts admin keys (one opened with credentials), every event read carries
who signed it (`RecordedEvent.signer`, checked as `newfuse.nats.signing` says: one Ed25519
verification per signed event); a signature that does not verify is reported to `on_invalid`
and the event read unsigned. Without a Trust nothing is checked and nothing costs more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

from nats.aio.client import Client
from nats.aio.msg import Msg

from newfuse.errors import (
    AtomicBatchUnsupportedError,
    DuplicateEventError,
    EventTooLargeError,
    FuseError,
    InvalidEnvelopeError,
    StoreUnavailableError,
)
from newfuse.eventstore.base import (
    ANY,
    NO_STREAM,
    AppendResult,
    EventFilter,
    EventStore,
    Expected,
    InvalidEventHandler,
    PreparedEvent,
    StoredRecord,
    VersionCheck,
    check_expected,
    wrong_expected,
)
from newfuse.nats import headers
from newfuse.nats.batch import BATCH_HEADER_BYTES, publish_atomic_batch
from newfuse.nats.connection import Credentials, connect, reads_own_subjects_only
from newfuse.nats.direct import DIRECT_BATCH, DirectGet
from newfuse.nats.direct import sequence_of as _seq_of
from newfuse.nats.election import FIRST_ATTEMPT_WAIT, ride_out
from newfuse.nats.jsapi import API, NANOSECONDS, api_error, api_request, stream_info
from newfuse.nats.jserrors import (
    BatchDuplicateIdError,
    PubAck,
    WrongLastSequenceError,
    decode_pub_ack,
    refused_error,
)
from newfuse.nats.ordered import OrderedPushConsumer
from newfuse.nats.placement import Placement, placement_of
from newfuse.nats.provision import EventStreamSpec, ensure_event_stream, server_version
from newfuse.nats.publish import PubAckInbox
from newfuse.nats.signing import IDENTITY, SenderError, Trust, identity_of, trust_of
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    Certified,
    Envelope,
    RecordedEvent,
    SchemaRegistry,
    as_utc,
    out_of_place,
    parse_envelope,
)

log = logging.getLogger("newfuse.eventstore.jetstream")

_CACHE_SIZE: Final = 65_536
"""Streams whose (version, last sequence) the store remembers."""


class JetStreamEventStore(EventStore):
    """The event store on NATS JetStream.

    Use `await JetStreamEventStore.connect(url, prefix=...)` (the store owns its connection), or
    `JetStreamEventStore(nc, prefix=...)` on a client you own (the store does not close it).

    Example:
        async with await JetStreamEventStore.connect("nats://127.0.0.1:4222") as store:
            await store.append("agent.r1", NewEvent(type="note", data={"text": "hi"}))
    """

    backend = "jetstream"

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = "fuse",
        registry: SchemaRegistry | None = None,
        on_invalid: InvalidEventHandler | None = None,
        replicas: int | None = None,
        max_age: float | None = None,
        max_bytes: int | None = None,
        duplicate_window: float = 120.0,
        timeout: float = 5.0,
        election_timeout: float = 15.0,
        heartbeat: float = 1.0,
        owns_connection: bool = False,
        create: bool = True,
        signers: bool = True,
    ) -> None:
        """Wrap a connected client; the stream is provisioned on first use (or `ensure_stream`).

        Args:
            nc: a connected nats-py client.
            prefix: first token of every subject; also names the JetStream stream.
            registry: payload schemas (default: the built-in types).
            on_invalid: called with each stored message that is not a valid event.
            replicas: copies of the JetStream stream when this store creates it; None: 3 on a
                cluster of 3 or more nodes (else the node count), 1 on a single server. An
                existing stream is used with the count it has (`replicas` tells it).
            max_age: seconds to keep events (None: forever).
            max_bytes: stream size limit (None: none).
            duplicate_window: seconds in which JetStream drops a repeated event id.
            timeout: seconds allowed for each server answer; a finite `read_all` that loses
                its server gives up this long after the loss.
            election_timeout: seconds an append, a read, `head_position` or the stream setup
                rides out a leader election or a reconnect, retrying (with the same event ids
                and expected sequence: nothing is stored twice) under one deadline; past it the
                retryable ElectionTimeoutError.
            heartbeat: idle heartbeat of the consumers behind read_all/subscribe; a consumer
                silent for three heartbeats is recreated from its last position.
            owns_connection: close `nc` when the store closes.
            create: provision the stream when it is missing; False, for a reader, raises
                StoreNotFoundError instead (naming the prefixes that exist).
            signers: check who signed each event read (`RecordedEvent.signer`) against the
                admin keys `nc` trusts (its credentials'), when it trusts any; False reads
                without the check (one Ed25519 verification per signed event).
        """
        super().__init__(registry=registry, on_invalid=on_invalid)
        self.nc = nc
        self.subjects = Subjects(prefix)
        self.stream_name = self.subjects.stream_name
        self._spec = EventStreamSpec(
            subjects=self.subjects,
            replicas=replicas,
            max_age=max_age,
            max_bytes=max_bytes,
            duplicate_window=duplicate_window,
        )
        self._event_prefix = f"{prefix}.ev."
        self._timeout = timeout
        self._election_timeout = election_timeout
        self._heartbeat = heartbeat
        self._owns = owns_connection
        self._create = create
        self._opened = False  # provisioned on first use (EventStore._open) or by ensure_stream
        self._ready_lock = asyncio.Lock()
        self._atomic = False
        self._server_version = ""
        self._replicas = replicas or 0  # known once provisioned
        self.elections_ridden = 0
        """Failed attempts (no leader, no answer, reconnecting) that a later one made good."""
        # stream -> (last valid version, last sequence on its subject, no invalid message seen)
        self._cache: dict[str, tuple[int, int, bool]] = {}
        self._append_queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._acks = PubAckInbox(nc, type(self).__name__)
        self._feeds: weakref.WeakSet[OrderedPushConsumer] = weakref.WeakSet()
        self._direct = DirectGet(nc, self.stream_name, timeout=timeout, patience=election_timeout)
        self._scoped = reads_own_subjects_only(nc)
        self._trust = trust_of(nc) if signers else None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = "fuse",
        registry: SchemaRegistry | None = None,
        name: str = "newfuse-eventstore",
        timeout: float = 5.0,  # noqa: ASYNC109 - a per-answer deadline, as in nats.py's API
        credentials: Credentials | None = None,
        ca: str | Path | None = None,
        **options: Any,
    ) -> JetStreamEventStore:
        """Connect to NATS, provision the events' stream, and return a store owning the link.

        Args:
            url: `nats://host:port`, several comma separated.
            prefix: first token of every subject; also names the JetStream stream.
            registry: payload schemas (default: the built-in types).
            name: the connection's name on the server.
            timeout: seconds for the first connect and for each server answer.
            credentials: connect as this identity (`fuse auth`); None: anonymously.
            ca: the CA certificate (PEM) to verify the server's TLS certificate with; the
                connection is then TLS (see `newfuse.nats.connect`).
            **options: the other keyword arguments of the constructor (replicas,
                election_timeout, max_age, max_bytes, duplicate_window, heartbeat, on_invalid,
                create, signers).

        Raises:
            ConnectionLostError: no server answered.
            UntrustedServerError: TLS was asked for and the server's certificate is not
                signed by the CA (or names another host), or the server offers no TLS.
            StreamConfigError: the stream exists with a configuration newfuse cannot use.
            StreamCreateError: JetStream refused to create the stream (it says what to change).
            StoreNotFoundError: `create=False` and the stream does not exist.
        """
        nc = await connect(url, name=name, timeout=timeout, credentials=credentials, ca=ca)
        store = cls(
            nc, prefix=prefix, registry=registry, timeout=timeout, owns_connection=True, **options
        )
        try:
            await store.ensure_stream()
        except BaseException:
            await store.close()
            raise
        return store

    async def ensure_stream(self) -> None:
        """Provision the JetStream stream (idempotent) and start the acknowledgement inbox.

        Raises:
            StoreClosedError: the store is closed, or was closed while provisioning.
            StreamConfigError, StreamCreateError, StoreUnavailableError: see `connect`.
        """
        if self._opened:
            return
        async with self._ready_lock:
            self._check_open()
            if self._opened:
                return
            state = await ride_out(
                lambda wait: ensure_event_stream(
                    self.nc, self._spec, timeout=wait, create=self._create
                ),
                operation=f"provision stream {self.stream_name!r}",
                deadline=self._deadline(),
                timeout=self._timeout,
                on_retry=self._count_retry,
            )
            # close() may have run while we waited; it takes this lock to close the inbox, so
            # checking here (under the lock) means nothing is started after it.
            self._check_open()
            self._atomic = state.atomic
            self._replicas = state.replicas
            self._server_version = state.server_version or server_version(self.nc)
            await self._acks.start()
            self._opened = True

    async def _open(self) -> None:
        await self.ensure_stream()

    @property
    def replicas(self) -> int:
        """How many copies the stream keeps (what it had, or what this store created it with);
        0 until the stream is provisioned."""
        return self._replicas

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._election_timeout

    def _count_retry(self, _error: Exception) -> None:
        self.elections_ridden += 1

    # -- appending --------------------------------------------------------------------------------

    async def _append(
        self, stream: str, events: list[PreparedEvent], expected: Expected
    ) -> AppendResult:
        if len(events) > 1 and not self._atomic:
            raise AtomicBatchUnsupportedError(
                stream=stream, server_version=self._server_version or "unknown"
            )
        # Appends to one stream from this store go one at a time (they would only conflict):
        # the first takes the stream, later ones queue a future and are handed the turn.
        queues = self._append_queues
        waiters = queues.get(stream)
        if waiters is None:
            waiters = queues[stream] = deque()
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters.append(turn)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._pass_turn(stream, waiters)  # we were given the turn: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        waiters.remove(turn)
                raise
        try:
            return await self._append_locked(stream, events, expected)
        finally:
            self._pass_turn(stream, waiters)

    def _pass_turn(self, stream: str, waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        del self._append_queues[stream]

    async def _append_locked(
        self, stream: str, events: list[PreparedEvent], expected: Expected
    ) -> AppendResult:
        subject = self._event_prefix + stream
        state = self._cache.get(stream)
        fresh = state is None
        if state is None:
            state = await self._fetch_state(stream, subject)
        deadline = 0.0
        started = asyncio.get_running_loop().time()  # one deadline for every attempt
        while True:
            version, seq, _ = state
            if expected is not ANY and not check_expected(expected, version):
                if not fresh:  # the cache may be behind other writers: ask the server
                    state = await self._fetch_state(stream, subject)
                    fresh = True
                    continue
                return await self._replay_or_conflict(stream, subject, events, expected, version)
            try:
                publish = partial(self._publish, stream, subject, events, version, seq)
                try:  # the fast path: one attempt, no retry machinery
                    ack = await publish(min(self._timeout, FIRST_ATTEMPT_WAIT))
                except FuseError as error:
                    if not error.retryable:
                        raise
                    ack = await ride_out(
                        publish,
                        operation=f"append to {stream!r}",
                        deadline=started + self._election_timeout,
                        timeout=self._timeout,
                        on_retry=self._count_retry,
                        failed=error,
                    )
            except WrongLastSequenceError:
                now = asyncio.get_running_loop().time()
                deadline = deadline or now + self._timeout
                if now > deadline:
                    raise StoreUnavailableError(
                        operation=f"append to {stream!r}",
                        reason=f"the stream kept changing for {self._timeout:g}s of retries",
                    ) from None
                state = await self._fetch_state(stream, subject)
                fresh = True
                continue
            except BatchDuplicateIdError:
                return await self._replayed_batch_result(stream, subject, events)
            except BaseException:
                self._cache.pop(stream, None)  # the outcome is unknown: ask next time
                raise
            count = len(events)
            if ack.duplicate:
                return await self._deduplicated_result(stream, events[0], ack.seq, version, seq)
            self._remember(stream, version + count, ack.seq, state[2])
            ids = [events[0].id] if count == 1 else [event.id for event in events]
            return AppendResult.of(stream, ids, version + 1, ack.seq - count + 1)

    async def _publish(
        self,
        stream: str,
        subject: str,
        events: list[PreparedEvent],
        version: int,
        seq: int,
        wait: float,
    ) -> PubAck:
        """One attempt to store `events` after `version` (at sequence `seq`), waiting `wait`
        seconds for each answer; a repeated attempt sends the same ids and expected sequence."""
        self._check_open()  # closed while this append waited for its turn or the stream state
        if len(events) == 1:
            event = events[0]
            body = event.encode(stream, version + 1)
            event_headers = _event_headers(event, version + 1, seq)
            self._check_size(stream, event, body, event_headers, 0)
            data = await self._acks.request(subject, body, event_headers, wait)
            return decode_pub_ack(data, subject=subject)
        messages = [
            (
                subject,
                event.encode(stream, version + offset),
                _event_headers(event, version + offset, seq if offset == 1 else None),
            )
            for offset, event in enumerate(events, 1)
        ]
        for event, (_, body, event_headers) in zip(events, messages, strict=True):
            self._check_size(stream, event, body, event_headers, BATCH_HEADER_BYTES)
        return await publish_atomic_batch(
            self.nc, messages, timeout=wait, server_version=self._server_version
        )

    @property
    def max_event_bytes(self) -> int:
        """The connected server's `max_payload` (from its INFO): the most one message, headers
        included, may hold."""
        return self.nc.max_payload

    _max_event_bytes_name = "the server's max_payload"

    def _check_size(
        self,
        stream: str,
        event: PreparedEvent,
        body: bytes,
        event_headers: dict[str, str],
        extra: int,
    ) -> None:
        """Refuse a message the server would count over `max_payload`: it would close the
        connection every caller of this store shares, not just fail this append."""
        size = headers.message_size(body, event_headers) + extra
        limit = self.nc.max_payload
        if size > limit:
            raise EventTooLargeError(
                stream=stream,
                event_id=event.id,
                size=size,
                limit=limit,
                limit_name=self._max_event_bytes_name,
            )

    def _remember(self, stream: str, version: int, seq: int, clean: bool) -> None:
        cache = self._cache
        if stream not in cache and len(cache) >= _CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[stream] = (version, seq, clean)

    async def _fetch_state(self, stream: str, subject: str) -> tuple[int, int, bool]:
        """(last valid version, last sequence, clean) of a stream, as the server has it now.

        The version comes from the last *valid* event (the wire rule: in its subject's stream,
        the previous valid version + 1), the sequence from the subject's last message, valid or
        not, since that is what `Nats-Expected-Last-Subject-Sequence` is checked against. What
        the cache holds is exact up to its sequence, so only later messages are read (ADR-31
        batched direct gets, `next_by_subj` from the cached sequence + 1): on a warm cache one
        request that finds nothing, on a miss a scan of the subject. `clean` says that every
        message up to the sequence was valid (so versions equal positions on the subject).
        """
        if self._scoped:
            return await self._last_state(stream, subject)
        version, seq, clean = self._cache.get(stream) or (0, 0, True)
        where = f"on {subject}"
        async for msg in self._subject_messages(subject, stream, seq + 1):
            seq = _seq_of(msg)
            envelope = _envelope_of(msg, where, stream)
            if envelope is not None and out_of_place(envelope, version) is None:
                version += 1
            else:
                clean = False
        self._remember(stream, version, seq, clean)
        return version, seq, clean

    async def _last_state(self, stream: str, subject: str) -> tuple[int, int, bool]:
        """`_fetch_state` for an identity whose permissions allow only a direct get of its own
        subjects' last message (`fuse auth`: an agent may not read the log). Nobody else may
        write those subjects but the bus's admins and services, so the last message is the
        last event; one that is not a valid event is refused rather than counted."""
        msg = await self._direct.last_for(subject, f"read {stream!r}")
        if msg is None:
            return 0, 0, True
        envelope = _envelope_of(msg, f"on {subject}", stream)
        if envelope is None:
            raise StoreUnavailableError(
                operation=f"append to {stream!r}",
                reason=f"its last message (sequence {_seq_of(msg)}) is not a valid event, and "
                "this identity may read only that one; an admin must repair the stream",
            )
        return envelope.version, _seq_of(msg), False

    async def _valid_events(self, subject: str, stream: str) -> AsyncIterator[tuple[int, Envelope]]:
        """(sequence, envelope) of each valid event of a stream, from its start, by the rule."""
        version, where = 0, f"on {subject}"
        async for msg in self._subject_messages(subject, stream):
            envelope = _envelope_of(msg, where, stream)
            if envelope is not None and out_of_place(envelope, version) is None:
                version += 1
                yield _seq_of(msg), envelope

    async def _replay_or_conflict(
        self,
        stream: str,
        subject: str,
        events: list[PreparedEvent],
        expected: Expected,
        actual: int,
    ) -> AppendResult:
        """The stream does not meet `expected`: a retry of an append that already happened
        returns its first result (even past the duplicate window); anything else conflicts."""
        base = expected if isinstance(expected, int) else 0 if expected is NO_STREAM else None
        if base is not None and base + len(events) <= actual:
            found = await self._events_from(subject, stream, base + 1, len(events))
            if [envelope.id for _, envelope in found] == [event.id for event in events]:
                return _result(stream, found)
        raise wrong_expected(stream, expected, actual)

    async def _deduplicated_result(
        self,
        stream: str,
        event: PreparedEvent,
        position: int,
        version: int,
        seq: int,
    ) -> AppendResult:
        """JetStream dropped a repeated event id (PubAck `duplicate`): return the first result."""
        if position == seq and version > 0:
            return AppendResult.of(stream, [event.id], version, position)
        msg = await self._direct.get(f"read {stream!r}", seq=position)
        loop = asyncio.get_running_loop()
        until = loop.time() + self._timeout
        while msg is None and loop.time() < until:
            # the leader has it at `position`, but a direct get may be answered by a replica
            # that has not applied it yet (seen right after a leader's death): ask again
            await asyncio.sleep(0.05)
            msg = await self._direct.get(f"read {stream!r}", seq=position)
        envelope = _envelope_of(msg, f"at {position}") if msg is not None else None
        if envelope is None or envelope.id != event.id:
            raise DuplicateEventError(
                stream=stream, event_id=event.id, reason="was stored before and cannot be found"
            )
        if envelope.stream != stream:
            raise DuplicateEventError(
                stream=stream,
                event_id=event.id,
                reason=f"was stored before in stream {envelope.stream!r} at position {position}",
            )
        return AppendResult.of(stream, [event.id], envelope.version, position)

    async def _replayed_batch_result(
        self, stream: str, subject: str, events: list[PreparedEvent]
    ) -> AppendResult:
        """A batch repeated ids seen within the duplicate window: find the first append."""
        wanted = [event.id for event in events]
        found: list[tuple[int, Envelope]] = []
        async for seq, envelope in self._valid_events(subject, stream):
            if found or envelope.id == wanted[0]:
                found.append((seq, envelope))
                if len(found) == len(wanted):
                    break
        if [envelope.id for _, envelope in found] == wanted:
            return _result(stream, found)
        raise DuplicateEventError(
            stream=stream,
            event_id=wanted[0],
            reason="or another id of the batch was appended before, elsewhere or in another "
            "batch; give new events new ids",
        )

    async def _events_from(
        self, subject: str, stream: str, first_version: int, count: int
    ) -> list[tuple[int, Envelope]]:
        found: list[tuple[int, Envelope]] = []
        async for seq, envelope in self._valid_events(subject, stream):
            if envelope.version < first_version:
                continue
            found.append((seq, envelope))
            if len(found) == count:
                break
        return found

    # -- who signed what --------------------------------------------------------------------------

    @property
    def verifies_signers(self) -> bool:
        return self._trust is not None

    @property
    def identity(self) -> Certified | None:
        return identity_of(self.nc)

    def _signer(
        self, subject: str, body: bytes, found: dict[str, str] | None, position: int, where: str
    ) -> Certified | None:
        """Who signed the message stored at `position` on `subject`; None when it is unsigned,
        or when its signature does not verify, which is reported like an invalid message (the
        event is still read: its version holds its place, and unsigned it counts for nothing
        that asks who wrote it)."""
        trust: Trust | None = self._trust
        if trust is None or not found or IDENTITY not in found:
            return None
        try:
            return trust.sender(subject, body, found)
        except SenderError as error:
            self._report(position, where, f"read as unsigned: {error}")
        except Exception as error:  # a checker's bug must not stop a reader either
            self._report(position, where, f"read as unsigned: checking raised {error!r}")
        return None

    # -- reading one stream -----------------------------------------------------------------------

    def _subject_messages(self, subject: str, stream: str, start: int = 1) -> AsyncIterator[Msg]:
        return self._direct.messages(subject, f"read {stream!r}", start)

    async def _read(
        self, stream: str, from_version: int | None, limit: int | None, backwards: bool
    ) -> AsyncIterator[RecordedEvent]:
        subject = self._event_prefix + stream
        where = f"on {subject}"
        decode, trust = self.decode, self._trust
        if backwards:
            top = from_version  # None: from the last event
            if top is None:
                top, _, _ = await self._fetch_state(stream, subject)
            first = max(1, top - limit + 1) if limit is not None else 1
            # Read forward from the first version wanted, keeping at most `limit` events.
            kept: deque[RecordedEvent] = deque(maxlen=limit)
            start, versions = await self._seek(subject, stream, first)
            async for msg in self._subject_messages(subject, stream, start):
                seq = _seq_of(msg)
                signer = (
                    None
                    if trust is None
                    else self._signer(subject, msg.data, msg.headers, seq, where)
                )
                event = decode(msg.data, seq, where, stream, versions, signer=signer)
                if event is None:
                    continue
                if event.version > top:
                    break
                kept.append(event)
            while kept:
                yield kept.pop()
            return
        count = 0
        first_wanted = from_version or 1
        start, versions = await self._seek(subject, stream, first_wanted)
        async for msg in self._subject_messages(subject, stream, start):
            seq = _seq_of(msg)
            signer = (
                None if trust is None else self._signer(subject, msg.data, msg.headers, seq, where)
            )
            event = decode(msg.data, seq, where, stream, versions, signer=signer)
            if event is None or event.version < first_wanted:
                continue
            yield event
            count += 1
            if count == limit:
                return

    async def _seek(self, subject: str, stream: str, version: int) -> tuple[int, VersionCheck]:
        """A sequence to start reading `subject` from so as to meet `version` first, and the
        version check to read on with (exact: it knows the version before that sequence).

        There is no version index, but on a clean stream (no invalid message on the subject)
        versions grow with sequences: a binary search over the stream's sequences with single
        direct gets (`next_by_subj`) finds the spot in about log2(head) requests. A stream with
        invalid messages, or a version near its start, is read from the start.
        """
        versions = VersionCheck(from_start=True)
        if version <= DIRECT_BATCH:
            return 1, versions
        known, last, clean = await self._fetch_state(stream, subject)
        if not clean:
            return 1, versions
        if version > known:
            versions[stream] = known
            return last + 1, versions
        low, high = 1, last
        while low < high:
            middle = (low + high) // 2
            msg = await self._direct.get(f"read {stream!r}", seq=middle, next_by_subj=subject)
            envelope = _envelope_of(msg, f"on {subject}", stream) if msg is not None else None
            if msg is None:
                high = middle
            elif envelope is None:
                return 1, VersionCheck(from_start=True)  # changed under us: read it all
            elif envelope.version >= version:
                high = middle
            else:
                low = _seq_of(msg) + 1
        versions[stream] = version - 1  # clean: the message met at `low` is `version`
        return low, versions

    async def _stream_version(self, stream: str) -> int:
        version, _, _ = await self._fetch_state(stream, self._event_prefix + stream)
        return version

    async def _head_position(self) -> int:
        return await ride_out(
            self._head_attempt,
            operation="head position",
            deadline=self._deadline(),
            timeout=self._timeout,
            on_retry=self._count_retry,
        )

    async def placement(self) -> Placement:
        """Where the JetStream stream's copies are: its leader, and each replica's state and
        lag (riding out an election like `head_position`).

        Raises:
            ElectionTimeoutError: no answer within the election timeout.
            JetStreamRefusedError: the stream is gone.
        """
        self._check_open()
        if not self._opened:
            await self._open()
        return await ride_out(
            self._placement_attempt,
            operation="stream placement",
            deadline=self._deadline(),
            timeout=self._timeout,
            on_retry=self._count_retry,
        )

    async def subscribers(self) -> dict[str, str]:
        """Named feeds (consumers with a description) -> the server their consumer sits on
        (riding out an election like `placement`: a listing asks every server of the stream).
        """
        self._check_open()
        if not self._opened:
            await self._open()
        return await ride_out(
            self._subscribers_attempt,
            operation="list consumers",
            deadline=self._deadline(),
            timeout=self._timeout,
            on_retry=self._count_retry,
        )

    async def _subscribers_attempt(self, wait: float) -> dict[str, str]:
        found: dict[str, str] = {}
        newest: dict[str, tuple[str, int]] = {}  # per feed, when its listed consumer was made
        # on one server a consumer has no `cluster` object: it sits on that server, ours; nats-py
        # keeps the server's INFO (its `server_name`) only in a private attribute
        alone = str(self.nc._server_info.get("server_name") or self.nc.connected_url or "")
        offset = 0
        while True:  # the server pages its listing (256 consumers a page)
            answer = await api_request(
                self.nc,
                f"{API}.CONSUMER.LIST.{self.stream_name}",
                {"offset": offset},
                timeout=wait,
                operation="list consumers",
            )
            refused = api_error(answer)
            if refused is not None:
                raise refused_error("list consumers", refused)
            consumers = answer.get("consumers") or []
            for consumer in consumers:
                description = (consumer.get("config") or {}).get("description")
                cluster = consumer.get("cluster")
                # a consumer whose server died is still listed, with no leader: not where the
                # feed is read now (a recreated consumer of the same feed is)
                leader = cluster.get("leader") if isinstance(cluster, dict) else alone
                if not isinstance(description, str) or not isinstance(leader, str) or not leader:
                    continue
                created = str(consumer.get("created") or "")
                if description not in newest or _created_key(created) > newest[description]:
                    newest[description] = _created_key(created)
                    found[description] = leader
            offset += len(consumers)
            if not consumers or offset >= answer.get("total", 0):
                return found

    async def _placement_attempt(self, wait: float) -> Placement:
        info = await stream_info(self.nc, self.stream_name, timeout=wait, operation="placement")
        refused = api_error(info)
        if refused is not None:
            raise refused_error("stream placement", refused)
        return placement_of(info)

    async def _head_attempt(self, wait: float) -> int:
        info = await stream_info(self.nc, self.stream_name, timeout=wait, operation="head position")
        refused = api_error(info)
        if refused is not None:
            raise refused_error("head position", refused)
        last: int = info.get("state", {}).get("last_seq", 0)
        return last

    async def _subject_counts(self, subjects: str, operation: str) -> dict[str, int]:
        """Messages per subject matching `subjects`, from STREAM.INFO (paged by the server)."""
        counts: dict[str, int] = {}
        while True:
            answer = await api_request(
                self.nc,
                f"{API}.STREAM.INFO.{self.stream_name}",
                {"subjects_filter": subjects, "offset": len(counts)},
                timeout=self._timeout,
                operation=operation,
            )
            refused = api_error(answer)
            if refused is not None:
                raise refused_error(operation, refused)
            page: dict[str, int] = answer.get("state", {}).get("subjects") or {}
            before = len(counts)
            counts.update(page)
            if len(counts) == before or len(counts) >= answer.get("total", 0):
                return counts

    async def _streams(self, category: str | None) -> AsyncIterator[str]:
        subjects = self.subjects.category(category) if category else self.subjects.all_events
        counts = await self._subject_counts(subjects, "list streams")
        start = len(self._event_prefix)
        for subject in sorted(counts):
            yield subject[start:]

    async def _stream_count(self, stream: str) -> int:
        subject = self._event_prefix + stream
        counts = await self._subject_counts(subject, f"count the messages of {stream!r}")
        return counts.get(subject, 0)

    # -- reading everything, subscribing ----------------------------------------------------------

    def _filter_subjects(self, filter: EventFilter) -> list[str]:
        # JetStream refuses overlapping filter subjects: the narrowest set that covers the filter
        # goes to the server, EventFilter.matches does the rest.
        if filter.streams:
            return sorted({self._event_prefix + stream for stream in filter.streams})
        if filter.categories:
            return sorted({self.subjects.category(category) for category in filter.categories})
        return [self.subjects.all_events]

    async def _read_all(
        self,
        from_position: int,
        since: datetime | None,
        until: datetime | None,
        filter: EventFilter,
        limit: int | None,
    ) -> AsyncIterator[RecordedEvent]:
        self._check_open()
        head = await self._head_position()
        if head < from_position:
            return
        until_ns = _epoch_ns(until) if until is not None else None
        feed = self._feed(filter, from_position, since, patience=self._timeout)
        try:
            if await feed.start() == 0:
                return
            decode, matches, count, trust = self.decode, filter.matches, 0, self._trust
            skip, start = len(self._event_prefix), from_position == 1 and since is None
            versions = VersionCheck(from_start=start)
            async for seq, stamp, pending, subject, data, found in feed:
                if seq > head or (until_ns is not None and stamp > until_ns):
                    return
                where = f"on {subject}"
                signer = None if trust is None else self._signer(subject, data, found, seq, where)
                event = decode(data, seq, where, subject[skip:], versions, signer=signer)
                if event is not None and matches(event.envelope):
                    yield event
                    count += 1
                    if count == limit:
                        return
                if seq >= head or pending == 0:
                    return
        finally:
            await feed.close()

    async def _records(self, from_position: int) -> AsyncIterator[StoredRecord]:
        self._check_open()
        head = await self._head_position()
        if head < from_position:
            return
        feed = self._feed(EventFilter(), from_position, None, patience=self._timeout)
        try:
            if await feed.start() == 0:
                return
            skip = len(self._event_prefix)
            async for seq, _, pending, subject, data, _ in feed:
                if seq > head:
                    return
                yield StoredRecord(seq, subject[skip:], data)
                if seq >= head or pending == 0:
                    return
        finally:
            await feed.close()

    async def _subscribe(
        self, filter: EventFilter, from_position: int, name: str | None = None
    ) -> AsyncIterator[RecordedEvent]:
        self._check_open()
        feed = self._feed(filter, from_position, None, patience=None, description=name)
        try:
            await feed.recreate()  # a live feed waits for the server instead of failing
            decode, matches, trust = self.decode, filter.matches, self._trust
            versions, skip = VersionCheck(from_start=from_position == 1), len(self._event_prefix)
            async for seq, _stamp, _pending, subject, data, found in feed:
                where = f"on {subject}"
                signer = None if trust is None else self._signer(subject, data, found, seq, where)
                event = decode(data, seq, where, subject[skip:], versions, signer=signer)
                if event is not None and matches(event.envelope):
                    yield event
        finally:
            await feed.close()

    def _feed(
        self,
        filter: EventFilter,
        start: int,
        since: datetime | None,
        *,
        patience: float | None,
        description: str | None = None,
    ) -> OrderedPushConsumer:
        subjects = self._filter_subjects(filter)
        feed = OrderedPushConsumer(
            self.nc,
            self.stream_name,
            subjects,
            start,
            since=since,
            heartbeat=self._heartbeat,
            timeout=self._timeout,
            patience=patience,
            owner=type(self).__name__,
            operation=f"read_all on {', '.join(subjects)}",
            description=description,
        )
        self._feeds.add(feed)  # close() ends it
        return feed

    # -- lifecycle --------------------------------------------------------------------------------

    async def _close(self) -> None:
        # Live feeds end first (their readers get StoreClosedError) and drop their consumers
        # while the connection is still up.
        feeds = list(self._feeds)
        for feed in feeds:
            feed.close_nowait()
        await asyncio.gather(*(feed.close() for feed in feeds))
        async with self._ready_lock:  # not while ensure_stream is between its checks
            await self._acks.close()
        if self._owns:
            with contextlib.suppress(Exception):
                await self.nc.close()


def _event_headers(event: PreparedEvent, version: int, expected_seq: int | None) -> dict[str, str]:
    found = {
        headers.MSG_ID: event.id,
        headers.TYPE: event.type,
        headers.SCHEMA_VERSION: str(event.schema_version),
        headers.STREAM_VERSION: str(version),
    }
    if expected_seq is not None:
        found[headers.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(expected_seq)
    if event.trace is not None:
        found[headers.TRACEPARENT] = event.trace.traceparent
        if event.trace.tracestate:
            found[headers.TRACESTATE] = event.trace.tracestate
    return found


def _envelope_of(msg: Msg, where: str, stream: str | None = None) -> Envelope | None:
    """The envelope of a stored message checked against its subject's stream, else None."""
    try:
        return parse_envelope(msg.data, where, stream)
    except InvalidEnvelopeError:
        return None


def _result(stream: str, found: list[tuple[int, Envelope]]) -> AppendResult:
    """The first result of an append whose events were `found` as (position, envelope)."""
    ids = [envelope.id for _, envelope in found]
    return AppendResult.of(stream, ids, found[0][1].version, found[0][0], found[-1][0])


def _epoch_ns(moment: datetime) -> int:
    return int(as_utc(moment).timestamp() * NANOSECONDS)


def _created_key(created: str) -> tuple[str, int]:
    """An RFC 3339 `created` time as the server writes it (up to nine fractional digits, the
    trailing zeros cut), as a key that sorts in time order."""
    whole, _, fraction = created.rstrip("Z").partition(".")
    return whole, int(fraction.ljust(9, "0")[:9] or 0)
