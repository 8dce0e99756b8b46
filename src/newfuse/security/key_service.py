"""The key service: agents seal and open payload fields without ever holding a subject's key.

An agent identity may not read the keys' bucket (it would read every subject's key), so a
process under a service identity answers two core NATS requests for it, the shape a KMS has:

- `<prefix>.keys.seal`: `{"event", "fields": [{"path", "subject", "value"}]}` -> `{"sealed":
  [SealedValue, ...]}`, one per field, in order: AES-256-GCM of the value's JSON with the
  subject's key (made when it has none), bound to (event id, field path, subject, key id) as
  any sealed value (schemas/sealed.py). Sealing discloses nothing: anyone may seal for anyone.
- `<prefix>.keys.open`: `{"position"}` -> `{"event", "values": {path: plaintext JSON},
  "redacted": [path, ...]}`. The service reads the message at that position of the message
  stream itself (or, with `subject` and `event`, the message of that event id on that
  subject at or after the position, among its next `MAX_SCAN`: how a client that got a reply
  through core NATS, without its position, names it), never trusting bytes the requester
  sends, and opens the sealed values of
  its payload (`$.payload.<name>`) only for whom the message is for or from: the identity
  that signed it, an agent instance or type it is addressed to, the client its reply
  subject names, the agents `topics` says read its topic, the workers of the task queue
  (agent type `task-<queue>`) a `<prefix>.task.<queue>.<priority>` message waits on.
  Admins, services and reviewers, who may read the keys' bucket anyway, may open any
  message. A forgotten subject's fields come back null and listed in `redacted`.

A sealed value is bound to its event id, and a sender chooses its event ids, so a value
copied (from a stolen backup) into a message of one's own under the original id would open
for its copier as that message's sender. So a service with a Trust notes who sealed each
event id (KV bucket `<prefix>_sealers`, event id -> the sealer's agent type or name; the
first to seal an id owns it, 409 for anyone else) and opens for others only a message whose
signer is that sealer.

Who asks (either request: a seal is counted against its asker's rate) is what the server and
a signature bind: a request carries its sender's certificate and Ed25519 signature
(`Fuse-Identity`, `Fuse-Signature`, nats/signing.py), checked against the admin keys the
service's own credentials trust, and its reply subject must be in that identity's inbox
(`_INBOX_<name>.`), where nats-server lets no one else subscribe; a request copied by someone
else is answered to its signer. A service without a Trust (a bus without identities) takes
the `requester` an open request names, as the agent runtime takes a claimed sender there: a
guard against mistakes, not a boundary.

Every request is foreign input: at most `MAX_REQUEST_BYTES`, `MAX_FIELDS` fields of at most
`MAX_VALUE_BYTES` each, paths of at most `MAX_PATH_CHARS`; anything else is answered with an
ADR-32 error (`Nats-Service-Error`, `Nats-Service-Error-Code`: 400 malformed, 403 refused, 404
no such message, 409 an event id another sealed, 422 a stored value that does not open, 429
more than `RATE` requests a second from one identity (where identities are known), 500 the
service's own failure, 503 its key store or the stream did not answer) and a body
`{"error": "..."}`, never a crash. At most `IN_FLIGHT` requests are served at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Final, Self

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from newfuse._closing import AsyncClosing
from newfuse.errors import (
    FuseError,
    InvalidEnvelopeError,
    KeyNotLoadedError,
    KeyServiceBusyError,
    KeyServiceError,
    KeyServiceRefusedError,
    KeyServiceUnavailableError,
    KeyStoreUnavailableError,
    SealedValueError,
)
from newfuse.nats import headers
from newfuse.nats.connection import Credentials, connect, guarded
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.micro import ERROR_CODE_HEADER, ERROR_HEADER, Endpoint, MicroService
from newfuse.nats.signing import Certified, SenderError, Trust, signed, trust_of
from newfuse.nats.subjects import Subjects
from newfuse.reliability import RateLimiter
from newfuse.schemas import ENVELOPE_DECODER, SealedValue, check_depth, check_event_id
from newfuse.schemas.sealed import ALGORITHM, SEALED_DECODER
from newfuse.security.crypto import SubjectCipher
from newfuse.security.keys import KeyStore, KVKeyStore, check_subject

log = logging.getLogger("newfuse.security")

SERVICE_NAME: Final = "newfuse-keys"
"""Its ADR-32 name (and queue group: instances share the requests)."""
MAX_REQUEST_BYTES: Final = 512 * 1024
"""Largest request body taken (NATS's default max payload is 1 MiB)."""
MAX_FIELDS: Final = 64
"""Fields one seal request may carry (the event store's bound on sealed fields per event)."""
MAX_VALUE_BYTES: Final = 64 * 1024
"""Largest JSON value one field may seal."""
MAX_PATH_CHARS: Final = 256
"""Longest field path (`$.payload.email`)."""
MAX_SCAN: Final = 256
"""Messages on a subject an open by event id looks through after the position it names."""
IN_FLIGHT: Final = 64
"""Requests served at once; the next one waits (nats-py buffers it) until one ends."""
RATE: Final = 2000.0
"""Requests a second one identity may make by default (bursts of twice that): an agent that
handles a thousand sealed messages a second asks about twice that."""
CACHED_SEALERS: Final = 65_536
"""Event ids whose sealer one service keeps in memory (the one cached first goes first)."""
TRACKED: Final = 1024
"""Identities whose request rates are tracked at once (the least recent is dropped)."""
PRIVILEGED: Final = frozenset({"admin", "service", "reviewer"})
"""Roles that may read the keys' bucket anyway, and so may open any message."""
PAYLOAD_PATH: Final = "$.payload."
"""Where an A2A message's sealed values are: top-level members of its payload."""
_MARK: Final = ALGORITHM.encode()


class SealField(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One value to seal: where it goes (`$.payload.email`), whose key seals it, its JSON."""

    path: str
    subject: str
    value: msgspec.Raw


class SealRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`<prefix>.keys.seal`: the event the values go into and the values."""

    event: str
    fields: list[SealField]


class SealReply(msgspec.Struct, frozen=True, kw_only=True):
    sealed: list[SealedValue]


class OpenRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`<prefix>.keys.open`: the message stream position of the message to open, and (for a
    service without a Trust only) who asks. With `subject` and `event`: the message of that
    event id on that subject (of the message stream) at or after `position`."""

    position: int
    requester: str | None = None
    subject: str | None = None
    event: str | None = None


class OpenReply(msgspec.Struct, frozen=True, kw_only=True):
    """The event id of the message opened, each sealed path's plaintext JSON (null when
    forgotten), and the paths forgotten."""

    event: str
    values: dict[str, msgspec.Raw]
    redacted: list[str] = []


class _Refusal(Exception):
    """What a request is answered with instead (an ADR-32 error code and a reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Metadata(msgspec.Struct, frozen=True):
    sender: Any = ""


class _Stored(msgspec.Struct, frozen=True):
    """What `open` reads of a stored A2A message: its payload's members and who it says sent it."""

    payload: dict[str, msgspec.Raw] | None = None
    metadata: _Metadata | None = None


_SEAL: Final = msgspec.json.Decoder(SealRequest)
_OPEN: Final = msgspec.json.Decoder(OpenRequest)
_STORED: Final = msgspec.json.Decoder(_Stored)
_ENCODE: Final = msgspec.json.Encoder()
_REPLY_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "seal": msgspec.json.Decoder(SealReply),
    "open": msgspec.json.Decoder(OpenReply),
}

Topics = Callable[[str], Iterable[str]]
"""The topics an identity (by name) reads: who else an `_topic.<topic>` message is for."""


class _Requester(msgspec.Struct, frozen=True):
    name: str
    role: str
    agent: str


class KeyService(AsyncClosing):
    """Seals and opens fields for agents (an async context manager on a service's connection).

    Example:
        async with KeyService(nc, await KVKeyStore.open(nc, "fuse"), owns_keys=True):
            ...  # agents on this bus may now send and read Personal()/Secret() fields

    Args:
        nc: a connection of a service identity (it may read the keys' bucket and the message
            stream, subscribe to `<prefix>.keys.*` and answer requests).
        keys: where the subjects' keys are (the bucket `<prefix>_keys` of the deployment).
        prefix: the subject prefix.
        trust: the admin keys requesters' certificates must be issued by (default: what
            `nc`'s credentials trust; None there: requesters are who they claim).
        topics: the topics an identity reads, by name (default: none, so only the sender of
            a topic message may open it).
        owns_keys: close `keys` on close.
        rate: requests a second one identity may make (bursts of twice that; None: no
            limit); beyond, it is answered 429, which a client raises as retryable.
    """

    def __init__(
        self,
        nc: Client,
        keys: KeyStore,
        *,
        prefix: str = "fuse",
        trust: Trust | None = None,
        topics: Topics | None = None,
        owns_keys: bool = False,
        rate: float | None = RATE,
    ) -> None:
        self.subjects = Subjects(prefix)
        self.rate = rate
        self._buckets: dict[str, RateLimiter] = {}
        self._sealers: KeyValue | None = None
        self._sealed_by: dict[str, str] = {}
        """Event id -> its sealer, as recorded (records never change): most opens follow
        their seal on the same service, and need no read of the bucket."""
        self.cipher = SubjectCipher(keys, owns_keys=owns_keys)
        self.trust = trust if trust is not None else trust_of(nc)
        self.served = 0
        """Requests answered (errors included)."""
        self.refused = 0
        """Requests answered with an error."""
        self._nc = nc
        self._topics = topics
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=5.0, patience=5.0)
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self._serving: set[asyncio.Task[None]] = set()
        self._subscriptions: list[Subscription] = []
        self.service = MicroService(
            nc,
            name=SERVICE_NAME,
            version="1.0.0",
            description="newfuse: seal and open payload fields for agents (keys stay here)",
            metadata={"prefix": prefix},
        )
        self._endpoints = {
            operation: self.service.add_endpoint(
                operation,
                subject=self.subjects.key_service(operation),
                queue_group=SERVICE_NAME,
                metadata={"limits": f"{MAX_FIELDS} fields of {MAX_VALUE_BYTES} bytes"},
            )
            for operation in ("seal", "open")
        }

    async def start(self) -> None:
        """Answer requests (idempotent).

        Raises:
            KeyServiceError: with a Trust, the bucket of who sealed which event
                (`<prefix>_sealers`) is not there and cannot be made (provision it first).
        """
        if self._subscriptions:
            return
        if self.trust is not None and self._sealers is None:
            self._sealers = await open_sealers(self._nc, self.subjects.prefix)
        for operation, endpoint in self._endpoints.items():
            self._subscriptions.append(
                await self._nc.subscribe(
                    endpoint.subject, queue=SERVICE_NAME, cb=self._taker(operation, endpoint)
                )
            )
        await self.service.start()
        await self._nc.flush()  # subscribed at the server before anyone is told it runs

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    def _taker(self, operation: str, endpoint: Endpoint) -> Callable[[Msg], Any]:
        async def take(msg: Msg) -> None:
            await self._slots.acquire()  # blocks this subscription's callbacks: backpressure
            task = asyncio.create_task(self._serve(operation, endpoint, msg))
            self._serving.add(task)
            task.add_done_callback(self._served)

        return take

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        self._slots.release()

    async def _serve(self, operation: str, endpoint: Endpoint, msg: Msg) -> None:
        started = time.perf_counter_ns()
        error: str | None = None
        answer: bytes = b""
        answer_headers: dict[str, str] | None = None
        try:
            if len(msg.data) > MAX_REQUEST_BYTES:
                raise _Refusal(
                    400, f"the request has {len(msg.data)} bytes; at most {MAX_REQUEST_BYTES}"
                )
            try:  # before any decode: a deep body is a RecursionError in msgspec
                check_depth(msg.data, f"the {operation} request")
            except InvalidEnvelopeError as deep:
                raise _Refusal(400, f"the request is refused: {deep.reason}") from None
            holder = self._signer(msg)
            self._within_rate(holder)
            answer = await (
                self._seal(msg, holder) if operation == "seal" else self._open(msg, holder)
            )
        except _Refusal as refusal:
            error, code = refusal.reason, refusal.code
        except FuseError as failure:
            error, code = str(failure), 503 if failure.retryable else 500
        except Exception as failure:  # a bug must not stop the service, nor go unanswered
            log.exception("key service: %s failed", operation)
            error, code = f"{type(failure).__name__}: {failure}", 500
        if error is not None:
            self.refused += 1
            answer = _ENCODE.encode({"error": error})
            one_line = " ".join(error.split())[:1024]
            answer_headers = {ERROR_HEADER: one_line, ERROR_CODE_HEADER: str(code)}
            log.info("key service: %s refused (%s): %s", operation, code, one_line)
        self.served += 1
        endpoint.record(time.perf_counter_ns() - started, error)
        if msg.reply:
            with contextlib.suppress(Exception):  # the asker may be gone
                await self._nc.publish(msg.reply, answer, headers=answer_headers)

    # -- seal ------------------------------------------------------------------------------------

    async def _seal(self, msg: Msg, holder: Certified | None) -> bytes:
        request = _decoded(_SEAL, msg.data, "seal")
        try:
            check_event_id(request.event)
        except FuseError as error:
            raise _Refusal(400, f"`event`: {error}") from None
        if not 0 < len(request.fields) <= MAX_FIELDS:
            raise _Refusal(
                400, f"`fields` has {len(request.fields)} values; give 1 to {MAX_FIELDS}"
            )
        paths: set[str] = set()
        for index, field in enumerate(request.fields):
            where = f"`fields[{index}]`"
            _check_path(field.path, where)
            if field.path in paths:
                raise _Refusal(400, f"{where}: path {field.path!r} is given twice")
            paths.add(field.path)
            try:
                check_subject(field.subject)
            except FuseError as error:
                raise _Refusal(400, f"{where}: {error}") from None
            size = len(field.value)
            if size > MAX_VALUE_BYTES:
                raise _Refusal(
                    400, f"{where}: the value has {size} bytes; at most {MAX_VALUE_BYTES}"
                )
        if holder is not None:
            await self._record(request.event, sealer_of(holder))
        subjects = {field.subject for field in request.fields}
        sealed: list[SealedValue] = []
        for attempt in range(2):
            await self.cipher.load(subjects, create=True)
            try:
                sealed = [
                    self.cipher.encrypt(f.subject, bytes(f.value), request.event, f.path)
                    for f in request.fields
                ]
                break
            except KeyNotLoadedError:  # forgotten between load and encrypt: a new key
                if attempt:
                    raise
        return _ENCODE.encode(SealReply(sealed=sealed))

    # -- open ------------------------------------------------------------------------------------

    async def _open(self, msg: Msg, holder: Certified | None) -> bytes:
        request = _decoded(_OPEN, msg.data, "open")
        requester = self._requester(holder, request)
        if type(request.position) is not int or not 0 < request.position < 2**63:
            raise _Refusal(400, f"`position` {request.position!r}: a stream sequence, 1 or more")
        if request.subject is None and request.event is None:
            stored = await self._direct.get("open sealed fields", seq=request.position)
            if stored is None:
                raise _Refusal(
                    404, f"no message at position {request.position} of the message stream"
                )
        else:
            stored = await self._find(request)
        subject = (stored.headers or {}).get(headers.SUBJECT, "")
        where = f"the message at position {sequence_of(stored)}"
        try:
            check_depth(stored.data, where)
            envelope = ENVELOPE_DECODER.decode(stored.data)
            body = _STORED.decode(envelope.data)
        except (FuseError, msgspec.DecodeError, msgspec.ValidationError):
            raise _Refusal(422, f"{where} is not an A2A message") from None
        signer = self._signer_of(subject, stored)
        if not self._may_open(requester, subject, signer, body):
            raise _Refusal(
                403,
                f"{requester.name!r} may not open {where}: it is neither its sender nor "
                f"addressed to it (subject {subject})",
            )
        found: list[tuple[str, SealedValue]] = []
        for name, raw in (body.payload or {}).items():
            if _MARK not in bytes(raw):
                continue
            try:
                found.append((PAYLOAD_PATH + name, SEALED_DECODER.decode(raw)))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not a sealed value by its form: not ours to open
        if found and requester.role not in PRIVILEGED:
            await self._check_sealer(envelope.id, signer, where)
        values: dict[str, msgspec.Raw] = {}
        redacted: list[str] = []
        for path, value in found:
            plaintext = await self._decrypt(value, envelope.id, path)
            if plaintext is None:
                redacted.append(path)
            values[path] = msgspec.Raw(b"null" if plaintext is None else plaintext)
        return _ENCODE.encode(OpenReply(event=envelope.id, values=values, redacted=redacted))

    async def _find(self, request: OpenRequest) -> Msg:
        """The message of event `request.event` on `request.subject` at or after its position,
        among the next `MAX_SCAN` messages there (a reply follows its request)."""
        subject, event = request.subject, request.event
        prefix = f"{self.subjects.prefix}.a2a."
        if not (
            isinstance(subject, str)
            and subject.startswith(prefix)
            and len(subject) <= MAX_PATH_CHARS
            and subject.isprintable()
            and not {"*", ">", " "} & set(subject)
        ):
            raise _Refusal(
                400, f"`subject` {subject!r:.80}: a subject of {prefix}> without wildcards"
            )
        if event is None:
            raise _Refusal(400, "`event`: name the event id to find on `subject`")
        try:
            check_event_id(event)
        except FuseError as error:
            raise _Refusal(400, f"`event`: {error}") from None
        seen = 0
        async for msg in self._direct.messages(subject, "find a message to open", request.position):
            if (msg.headers or {}).get(headers.MSG_ID) == event and _id_of(msg.data) == event:
                return msg
            seen += 1
            if seen >= MAX_SCAN:
                break
        raise _Refusal(
            404,
            f"no message of event {event!r} on {subject} among the {MAX_SCAN} from position "
            f"{request.position} on (not stored yet?)",
        )

    async def _decrypt(self, value: SealedValue, event_id: str, path: str) -> bytes | None:
        try:
            try:
                return self.cipher.decrypt(value, event_id, path)
            except KeyNotLoadedError:
                await self.cipher.fetch([(value.sub, value.kid)])
                return self.cipher.decrypt(value, event_id, path)
        except SealedValueError as error:
            raise _Refusal(422, str(error)) from None

    def _requester(self, holder: Certified | None, request: OpenRequest) -> _Requester:
        """Who asks: the identity that signed the request (`_signer`); without a Trust, who
        the request says."""
        if holder is not None:
            return _Requester(holder.name, holder.role, holder.agent)
        claimed = request.requester
        if not isinstance(claimed, str) or not 0 < len(claimed) <= 256:
            raise _Refusal(403, "this key service knows no identities: name `requester`")
        return _Requester(claimed, "agent", claimed)

    def _signer(self, msg: Msg) -> Certified | None:
        """The identity that signed `msg` and whose inbox its answer goes to (None: this
        service has no Trust, so it cannot tell)."""
        trust = self.trust
        if trust is None:
            return None
        try:
            holder: Certified = trust.sender(msg.subject, msg.data, msg.headers)
        except SenderError as error:
            raise _Refusal(403, f"who asks is not known: {error}") from None
        inbox = f"_INBOX_{holder.name}"
        if (msg.reply or "").split(".", 1)[0] != inbox:
            raise _Refusal(
                403,
                f"the answer would go to {msg.reply!r:.80}, not to the inbox of {holder.name!r}",
            )
        return holder

    def _within_rate(self, holder: Certified | None) -> None:
        """Count a request of `holder`; a 429 past `rate` a second (bursts of twice that).
        Without a Trust there is no telling askers apart, and one bucket for all would only
        slow the bus down: no limit there."""
        if self.rate is None or holder is None:
            return
        name = holder.name
        bucket = self._buckets.pop(name, None)  # re-inserted: the least recent goes first
        if bucket is None:
            if len(self._buckets) >= TRACKED:
                del self._buckets[next(iter(self._buckets))]
            bucket = RateLimiter(self.rate, max(1, int(self.rate * 2)))
        self._buckets[name] = bucket
        if not bucket.try_acquire():
            raise _Refusal(
                429, f"{name!r} asks more than {self.rate:g} times a second; try again shortly"
            )

    def _may_open(
        self, who: _Requester, subject: str, signer: Certified | None, body: _Stored
    ) -> bool:
        if who.role in PRIVILEGED:
            return True
        if self._sent_by(who, signer, body):
            return True
        agent_type, _, agent_key = who.agent.partition("/")
        queued = f"{self.subjects.prefix}.task."
        if subject.startswith(queued):  # `<prefix>.task.<queue>.<priority>`: for its workers
            tokens = subject[len(queued) :].split(".")
            return len(tokens) == 2 and agent_type == f"task-{tokens[0]}"  # (agents/queues.py)
        prefix = f"{self.subjects.prefix}.a2a."
        if not subject.startswith(prefix):
            return False
        tokens = subject[len(prefix) :].split(".")
        if tokens[0] == "_reply":
            return len(tokens) == 2 and tokens[1] == who.name
        if tokens[0] == "_topic":
            topics = self._topics
            return len(tokens) == 2 and topics is not None and tokens[1] in set(topics(who.name))
        if tokens[0].startswith("_") or not agent_type:
            return False  # bookkeeping (markers, dead letters, tasks): its writer only
        if len(tokens) == 1:
            return tokens[0] == agent_type
        return len(tokens) == 2 and tokens == [agent_type, agent_key]

    def _sent_by(self, who: _Requester, signer: Certified | None, body: _Stored) -> bool:
        if self.trust is None:
            claimed = body.metadata.sender if body.metadata is not None else ""
            return isinstance(claimed, str) and claimed == who.name
        return signer is not None and signer.name == who.name

    def _signer_of(self, subject: str, stored: Msg) -> Certified | None:
        """Who signed the stored message (None: unsigned, or no Trust to check it with)."""
        if self.trust is None:
            return None
        try:
            return self.trust.sender(subject, stored.data, stored.headers)
        except SenderError:
            return None

    async def _record(self, event_id: str, sealer: str) -> None:
        """Note that `sealer` sealed values for `event_id` (again, after a redelivery, is
        fine); 409 when another sealed for that event id first."""
        records = self._sealers
        if records is None:
            return
        if self._sealed_by.get(event_id) == sealer:
            return
        key = _kv_key(event_id)
        try:
            try:
                await records.create(key, sealer.encode())
                self._remember(event_id, sealer)
                return
            except KeyWrongLastSequenceError:
                found = await records.get(key)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            found = None
        except Exception as error:
            raise self._records_unavailable(error) from None
        earlier = (found.value or b"").decode(errors="replace") if found is not None else ""
        if earlier == sealer:
            self._remember(event_id, sealer)
        else:
            raise _Refusal(
                409, f"event {event_id!r:.80} was sealed for {earlier!r:.80} first: use another id"
            )

    def _remember(self, event_id: str, sealer: str) -> None:
        if event_id not in self._sealed_by and len(self._sealed_by) >= CACHED_SEALERS:
            del self._sealed_by[next(iter(self._sealed_by))]
        self._sealed_by[event_id] = sealer

    def _records_unavailable(self, error: Exception) -> KeyStoreUnavailableError:
        bucket = sealers_bucket(self.subjects.prefix)
        return KeyStoreUnavailableError(
            store=f"KV bucket {bucket!r}", reason=f"{type(error).__name__}: {error}"
        )

    async def _check_sealer(self, event_id: str, signer: Certified | None, where: str) -> None:
        """Refuse to open the sealed values of a message whose signer is not who sealed them:
        the event id binds a sealed value, and a sender chooses its event ids, so a copy of a
        stolen value under its own id would otherwise open for whoever stored the copy."""
        records = self._sealers
        if records is None:
            return
        sealer = self._sealed_by.get(event_id)
        if sealer is None:
            try:
                found = await records.get(_kv_key(event_id))
            except KeyNotFoundError:
                found = None
            except Exception as error:
                raise self._records_unavailable(error) from None
            if found is None:
                raise _Refusal(
                    403, f"no record that event {event_id!r:.80} ({where}) was sealed here"
                )
            sealer = (found.value or b"").decode(errors="replace")
            self._remember(event_id, sealer)
        signed_by = "nobody" if signer is None else repr(signer.name)
        if signer is None or sealer_of(signer) != sealer:
            raise _Refusal(
                403,
                f"event {event_id!r:.80} was sealed for {sealer!r}, but {signed_by} signed "
                f"{where}: a copy does not open",
            )

    async def close(self) -> None:
        """Stop answering; requests being served finish first. Idempotent."""
        await self.service.stop()
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if self._serving:
            await asyncio.wait(list(self._serving))
        await self.cipher.close()


class _Id(msgspec.Struct, frozen=True):
    id: Any = None


_ID: Final = msgspec.json.Decoder(_Id)


def _id_of(body: bytes) -> object:
    """The `id` of a stored envelope (None when the body is not one)."""
    try:
        check_depth(body, "a stored message")
        return _ID.decode(body).id
    except (FuseError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def sealers_bucket(prefix: str) -> str:
    """The KV bucket of who sealed which event: `<prefix>_sealers`."""
    return f"{prefix}_sealers"


def sealer_of(holder: Certified) -> str:
    """Whose an event's sealed values are: an agent identity's type (its instances handle
    one another's redeliveries, whose effects keep their ids), any other identity's name."""
    if holder.role == "agent":
        return holder.agent.partition("/")[0] or holder.name
    return holder.name


async def open_sealers(
    nc: Client, prefix: str, *, replicas: int = 1, align: bool = False
) -> KeyValue:
    """The bucket `<prefix>_sealers` (event id -> who sealed it, history 1), made when missing
    (an admin may; a service identity only opens it: `provision` makes it). Its entries live
    as long as the messages they are about: its max age is the message stream's (forever
    when that has none, or is not there yet). With `align` (an admin's `provision`), an
    existing bucket's max age is set to the message stream's again, when that changed.

    Raises:
        KeyServiceError: it is not there and cannot be made, or the server did not answer.
    """
    bucket = sealers_bucket(prefix)
    js = nc.jetstream()
    try:
        try:
            records = await js.key_value(bucket)
        except (NotFoundError, KeyNotFoundError):
            return await js.create_key_value(
                bucket=bucket,
                history=1,
                replicas=replicas,
                ttl=await _message_max_age(nc, prefix) or None,
                description="newfuse: who sealed which event's fields (the key service)",
            )
        if align:
            info = await js.stream_info(f"KV_{bucket}")
            wanted = await _message_max_age(nc, prefix)
            if (info.config.max_age or 0.0) != wanted:
                await js.update_stream(dataclasses.replace(info.config, max_age=wanted))
        return records
    except Exception as error:
        raise KeyServiceError(
            operation="start",
            code=500,
            reason=f"KV bucket {bucket!r}: {type(error).__name__}: {error}; an admin makes it "
            "(newfuse.agents.secure.provision, which fuse dev --secure runs)",
        ) from None


async def _message_max_age(nc: Client, prefix: str) -> float:
    """The message stream's max age in seconds (0: forever, or no such stream yet)."""
    try:
        info = await nc.jetstream().stream_info(Subjects(prefix).message_stream_name)
    except NotFoundError:
        return 0.0
    return float(info.config.max_age or 0.0)


def _kv_key(text: str) -> str:
    """A KV key for any text (KV keys allow `[-/_=.A-Za-z0-9]`)."""
    return base64.urlsafe_b64encode(text.encode()).decode()


def _decoded(decoder: msgspec.json.Decoder[Any], data: bytes, operation: str) -> Any:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise _Refusal(400, f"not a {operation} request: {error}") from None


def _check_path(path: str, where: str) -> None:
    if not path.startswith("$.") or len(path) > MAX_PATH_CHARS or not path.isprintable():
        raise _Refusal(
            400,
            f"{where}: path {path!r:.80} must start with `$.` and have at most "
            f"{MAX_PATH_CHARS} printable characters",
        )


@contextlib.asynccontextmanager
async def serving_keys(
    url: str,
    *,
    credentials: Credentials | None,
    prefix: str,
    ca: str | None = None,
    topics: Topics | None = None,
) -> AsyncIterator[KeyService]:
    """A key service on its own connection (as `credentials`, a service identity's; anonymous
    on a bus without identities), over the keys' bucket of `prefix`: what `fuse dev` runs."""
    nc = await connect(url, name="fuse-keys", credentials=credentials, ca=ca)
    try:
        keys = await KVKeyStore.open(nc, prefix)
        async with KeyService(nc, keys, prefix=prefix, topics=topics, owns_keys=True) as service:
            yield service
    finally:
        await nc.close()


class KeyServiceClient:
    """Asks the key service to seal and open fields (what the agent runtime uses).

    Args:
        nc: the caller's connection; its requests are signed when it has credentials.
        prefix: the subject prefix.
        requester: who asks, named for a key service without identities (where it has them,
            the signature decides and this is ignored).
        timeout: seconds to wait for an answer.
    """

    def __init__(
        self, nc: Client, *, prefix: str = "fuse", requester: str = "", timeout: float = 5.0
    ) -> None:
        self.subjects = Subjects(prefix)
        self.requester = requester
        self.timeout = timeout
        self._nc = nc

    async def seal(self, event_id: str, fields: list[SealField]) -> list[SealedValue]:
        """The sealed values of `fields`, in order, for the event `event_id`.

        Raises:
            KeyServiceUnavailableError: no key service answered.
            KeyServiceError: it refused (the reason says why).
        """
        reply = await self._ask("seal", _ENCODE.encode(SealRequest(event=event_id, fields=fields)))
        assert isinstance(reply, SealReply)
        if len(reply.sealed) != len(fields):
            raise KeyServiceError(
                operation="seal",
                code=500,
                reason=f"{len(reply.sealed)} sealed values came back for {len(fields)} fields",
            )
        return reply.sealed

    async def open(
        self,
        position: int,
        *,
        subject: str | None = None,
        event: str | None = None,
        requester: str | None = None,
    ) -> OpenReply:
        """The opened sealed fields of the message at `position` of the message stream (with
        `subject` and `event`: of the message of that event id on that subject at or after
        `position`, for a message that came without its position).

        Args:
            requester: who asks this time, for a key service without identities (default:
                `self.requester`).

        Raises:
            KeyServiceUnavailableError: no key service answered.
            KeyServiceRefusedError: this identity may not open that message.
            KeyServiceError: any other refusal (the reason says why; 404: not found).
        """
        request = OpenRequest(
            position=position,
            requester=requester or self.requester or None,
            subject=subject,
            event=event,
        )
        reply = await self._ask("open", _ENCODE.encode(request))
        assert isinstance(reply, OpenReply)
        return reply

    async def _ask(self, operation: str, body: bytes) -> SealReply | OpenReply:
        subject = self.subjects.key_service(operation)
        try:
            answer = await guarded(
                self._nc,
                subject,
                self._nc.request(
                    subject,
                    body,
                    timeout=self.timeout,
                    headers=signed(self._nc, subject, body, {}) or None,
                ),
            )
        except NoRespondersError:
            raise KeyServiceUnavailableError(
                operation=operation, subject=subject, reason="no responders"
            ) from None
        except (TimeoutError, NatsError) as error:
            reason = type(error).__name__ if isinstance(error, TimeoutError) else str(error)
            raise KeyServiceUnavailableError(
                operation=operation, subject=subject, reason=reason or "timeout"
            ) from None
        found = answer.headers or {}
        if ERROR_HEADER in found:
            try:
                code = int(found.get(ERROR_CODE_HEADER, "500"))
            except ValueError:
                code = 500
            reason = found[ERROR_HEADER]
            kind = (
                KeyServiceRefusedError
                if code == 403
                else KeyServiceBusyError  # too many requests; or its key store did not answer
                if code in (429, 503)
                else KeyServiceError
            )
            raise kind(operation=operation, code=code, reason=reason)
        try:
            decoded: SealReply | OpenReply = _REPLY_DECODERS[operation].decode(answer.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise KeyServiceError(
                operation=operation, code=500, reason=f"its answer is malformed: {error}"
            ) from None
        return decoded
