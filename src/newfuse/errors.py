"""The FuseError hierarchy: one base, one subclass per failure, each naming what went wrong.

Every error carries the facts as attributes (so programs need not parse messages) and says
whether retrying can help (`retryable`). Consumers map that mechanically: retryable -> nak with
a delay; not retryable -> terminate and record a dead letter.

This module is a leaf: it imports nothing of newfuse, and every layer may import it.
"""

from __future__ import annotations

from typing import ClassVar


def _shown(name: str, keep: int = 64) -> str:
    """A name as quoted in a message: cut to `keep` characters when longer (it may be huge)."""
    return repr(name) if len(name) <= keep else f"{name[:keep]!r}... ({len(name)} characters)"


class FuseError(Exception):
    """Base of every error newfuse raises on purpose."""

    retryable: ClassVar[bool] = False


def _listed(versions: list[int]) -> str:
    return ", ".join(map(str, versions)) or "none"


# -- configuration and servers ---------------------------------------------------------------------


class ConfigError(FuseError, ValueError):
    """A setting has a value newfuse cannot use."""

    def __init__(self, *, variable: str, value: object, reason: str) -> None:
        self.variable = variable
        self.value = value
        self.reason = reason
        super().__init__(f"{variable}={value!r}: {reason}")


class ServerStartError(FuseError):
    """An embedded server (nats-server, valkey-server) did not start; quotes its log."""

    def __init__(self, *, server: str, reason: str, log_tail: str = "") -> None:
        self.server = server
        self.reason = reason
        self.log_tail = log_tail
        message = f"{server} did not start: {reason}"
        if log_tail:
            quoted = "\n".join(f"    {line}" for line in log_tail.splitlines())
            message += f"\nlast lines of its log:\n{quoted}"
        super().__init__(message)


class ClusterNotReadyError(ServerStartError):
    """A local cluster did not reach what was asked (a meta leader with every peer current, a
    stream leader) in time; waiting longer may help."""

    retryable = True


class ServerNotFoundError(FuseError):
    """No binary for an embedded server could be found."""

    def __init__(self, *, server: str, looked_in: list[str], hint: str) -> None:
        self.server = server
        self.looked_in = looked_in
        super().__init__(f"no {server} binary found (looked in: {', '.join(looked_in)}); {hint}")


class NoDevServerError(FuseError):
    """A command needs servers, none is configured and no `fuse dev` is running."""

    def __init__(self, *, what: str, state_file: str) -> None:
        self.what = what
        self.state_file = state_file
        super().__init__(self.message())

    def message(self) -> str:
        """The error's text; subclasses with other facts say it their way."""
        return (
            f"no {self.what} configured and no running `fuse dev` found (looked at "
            f"{self.state_file}); start one with `fuse dev` in another terminal, or set "
            f"FUSE_NATS_URL / FUSE_REDIS_URL"
        )


class DevProcessGoneError(NoDevServerError):
    """The state file records a `fuse dev` whose process is gone (killed, crashed, rebooted)."""

    def __init__(self, *, what: str, pid: int, state_file: str) -> None:
        self.pid = pid
        super().__init__(what=what, state_file=state_file)

    def message(self) -> str:
        return (
            f"no {self.what} configured, and the `fuse dev` recorded in {self.state_file} (pid "
            f"{self.pid}) is gone, its servers with it; start `fuse dev` again, or set "
            f"FUSE_NATS_URL / FUSE_REDIS_URL"
        )


class DevAlreadyRunningError(FuseError):
    """A `fuse dev` already runs with the same state directory."""

    def __init__(self, *, pid: int, nats_url: str, state_file: str) -> None:
        self.pid = pid
        self.nats_url = nats_url
        self.state_file = state_file
        super().__init__(
            f"a `fuse dev` already runs (pid {pid}, NATS at {nats_url}, recorded in "
            f"{state_file}); use it, stop it first, or set FUSE_STATE_DIR for a second one"
        )


class HealthServerError(FuseError):
    """The health and metrics server cannot listen where it was asked to."""

    def __init__(self, *, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(
            f"health server on {address}: {reason}; choose a free port (0 picks one) on an "
            f"address of this host (--health / FUSE_HEALTH_ADDR)"
        )


class ConnectionLostError(FuseError):
    """A server could not be reached within the deadline."""

    retryable = True

    def __init__(self, *, server: str, url: str, reason: str) -> None:
        self.server = server
        self.url = url
        super().__init__(f"{server} at {url} is unreachable: {reason}")


# -- names and schemas -----------------------------------------------------------------------------


class InvalidNameError(FuseError, ValueError):
    """A stream, category, id, agent or queue name breaks the naming rules of the wire contract."""

    def __init__(self, *, kind: str, name: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.reason = reason
        super().__init__(f"invalid {kind} {_shown(name)}: {reason}")


class NameTooLongError(InvalidNameError):
    """A name is longer than the wire contract allows (UTF-8 bytes); nothing was sent."""

    def __init__(self, *, kind: str, name: str, size: int, limit: int, limit_name: str) -> None:
        self.size = size
        self.limit = limit
        self.limit_name = limit_name
        super().__init__(
            kind=kind,
            name=name,
            reason=f"it is {size} bytes long (UTF-8), the limit is {limit} ({limit_name}); use "
            f"a shorter one (a hash of a long key, for instance)",
        )


class SchemaError(FuseError):
    """Base of the errors about event types, schema versions and payloads."""


class UnknownTypeError(SchemaError, LookupError):
    """An event type is not registered where it must be (a strict category, an upcaster, ...)."""

    def __init__(self, *, type_name: str, context: str = "") -> None:
        self.type_name = type_name
        where = f" ({context})" if context else ""
        super().__init__(
            f"event type {type_name!r} is not registered{where}; register a payload struct for "
            f"it with SchemaRegistry.register"
        )


class UnknownVersionError(SchemaError, LookupError):
    """A type is registered but not at the schema version asked for, and no upcaster reaches it."""

    def __init__(self, *, type_name: str, version: int, known: list[int]) -> None:
        self.type_name = type_name
        self.version = version
        self.known = known
        super().__init__(self.message())

    def message(self) -> str:
        """The text of the error, from its attributes (subclasses say more)."""
        return (
            f"event type {self.type_name!r} has no schema version {self.version} "
            f"(known versions: {_listed(self.known)}); register it, or an upcaster from it"
        )


class MissingUpcasterError(UnknownVersionError):
    """An old schema version of a type has no chain of upcasters up to the newest version."""

    def __init__(
        self, *, type_name: str, version: int, known: list[int], missing_from: int, newest: int
    ) -> None:
        self.missing_from = missing_from
        self.newest = newest
        super().__init__(type_name=type_name, version=version, known=known)

    def message(self) -> str:
        """The text of the error, from its attributes."""
        return (
            f"event type {self.type_name!r} v{self.version} cannot be upcast to v{self.newest}: "
            f"no upcaster from v{self.missing_from} to v{self.missing_from + 1} (known versions: "
            f"{_listed(self.known)}); register one with "
            f"@registry.upcaster({self.type_name!r}, {self.missing_from})"
        )


class SchemaRegistrationError(SchemaError, ValueError):
    """A payload struct or upcaster cannot be registered as asked; the registry is unchanged."""

    def __init__(self, *, type_name: str, version: int, reason: str) -> None:
        self.type_name = type_name
        self.version = version
        self.reason = reason
        super().__init__(f"cannot register {type_name!r} v{version}: {reason}")


class InvalidPayloadError(SchemaError, ValueError):
    """A payload does not match the schema of its type and version."""

    def __init__(self, *, type_name: str, version: int, path: str, reason: str) -> None:
        self.type_name = type_name
        self.version = version
        self.path = path
        self.reason = reason
        super().__init__(f"invalid payload for {type_name!r} v{version} at {path}: {reason}")


class NestingTooDeepError(InvalidPayloadError):
    """A payload nests arrays/objects deeper than the wire contract allows; nothing was sent."""

    def __init__(self, *, type_name: str, version: int, depth: int | None, limit: int) -> None:
        self.depth = depth
        self.limit = limit
        found = (
            f"{depth} levels of arrays/objects"
            if depth is not None
            else "arrays/objects deeper than the encoder can follow"
        )
        super().__init__(
            type_name=type_name,
            version=version,
            path="$",
            reason=f"it nests {found}, the limit is {limit} (MAX_NESTING_DEPTH); flatten the data",
        )


class InvalidEnvelopeError(SchemaError, ValueError):
    """A message on an event subject is not a valid newfuse envelope."""

    def __init__(self, *, where: str, path: str, reason: str) -> None:
        self.where = where
        self.path = path
        self.reason = reason
        super().__init__(f"invalid envelope {where} at {path}: {reason}")


class ProtocolVersionError(SchemaError, ValueError):
    """A message's protocol version is not one the reader accepts (or not a version at all).

    Retrying cannot help: the message is refused, not handled (an agent dead-letters it and
    answers a requester with `<type>.error`).
    """

    def __init__(self, *, version: str, reason: str, where: str = "", accepted: str = "") -> None:
        self.version = version
        self.reason = reason
        self.where = where
        self.accepted = accepted
        super().__init__(self.message())

    def message(self) -> str:
        """The text of the error, from its attributes."""
        of = f" of the message {self.where}" if self.where else ""
        accepts = f"; this agent accepts {self.accepted!r}" if self.accepted else ""
        return f"protocol_version {_shown(self.version, 32)}{of}: {self.reason}{accepts}"


class VersionRangeError(SchemaError, ValueError):
    """A protocol version range (`Agent(protocols=...)`) cannot be parsed or admits nothing."""

    def __init__(self, *, spec: str, reason: str) -> None:
        self.spec = spec
        self.reason = reason
        super().__init__(
            f"protocol range {spec!r}: {reason}; write comparisons joined by commas, such as "
            f"'>=1.0,<2.0'"
        )


class InvalidEventError(SchemaError, ValueError):
    """An event given to append lacks what the store needs to write it (a type, a valid version)."""

    def __init__(self, *, stream: str, event_id: str, reason: str) -> None:
        self.stream = stream
        self.event_id = event_id
        self.reason = reason
        super().__init__(f"append to {stream}: event {event_id} {reason}")


# -- sealed (encrypted) payload fields -------------------------------------------------------------


class SealedValueError(SchemaError, ValueError):
    """A sealed field's value does not open: moved from another event or field, tampered with,
    or not a sealed value at all. The event is reported and skipped like any invalid one."""

    def __init__(self, *, event_id: str, path: str, reason: str) -> None:
        self.event_id = event_id
        self.path = path
        self.reason = reason
        super().__init__(f"sealed field {path} of event {_shown(event_id)}: {reason}")


class KeyNotLoadedError(FuseError):
    """The key cache does not hold the key a sealed value names yet; the reader loads it from
    the key store and decodes the event again (a signal between store and cipher)."""

    retryable = True

    def __init__(self, *, subject: str, kid: str) -> None:
        self.subject = subject
        self.kid = kid
        super().__init__(f"key {_shown(kid)} of data subject {_shown(subject)} is not loaded")


class SealingUnavailableError(FuseError):
    """An event whose type declares personal or secret fields cannot be written in the clear:
    the store has no key store to seal them with."""

    def __init__(self, *, stream: str, type_name: str, fields: list[str]) -> None:
        self.stream = stream
        self.type_name = type_name
        self.fields = fields
        super().__init__(
            f"append to {stream}: type {type_name!r} declares sealed field(s) "
            f"{', '.join(fields)}, and this store has no key store; open it with one "
            f"(newfuse.security.use_keys) so they are encrypted before they leave"
        )


class KeyStoreError(FuseError):
    """The key store cannot be used as asked (a file, a bucket, a malformed entry)."""

    def __init__(self, *, store: str, reason: str) -> None:
        self.store = store
        self.reason = reason
        super().__init__(f"key store {store}: {reason}")


class KeyStoreUnavailableError(KeyStoreError):
    """The key store did not answer (server down, timeout); trying again may help."""

    retryable = True


class KeyStoreMissingError(KeyStoreError):
    """The key store is not there and was not to be made (a command that only reads): nothing
    was ever sealed with it."""


# -- event store -----------------------------------------------------------------------------------


class EventStoreError(FuseError):
    """Base of the event store's errors."""


class WrongExpectedVersionError(EventStoreError):
    """An append's expected version does not match the stream; nothing was written."""

    def __init__(self, *, stream: str, expected: str | int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        expected_text = f"version {expected}" if isinstance(expected, int) else str(expected)
        actual_text = f"at version {actual}" if actual else "empty (no stream)"
        super().__init__(
            f"append to {stream!r}: expected {expected_text}, stream is {actual_text}; "
            f"read the stream and retry with its current version"
        )


class DuplicateEventError(EventStoreError):
    """An event id was appended before with other content or at another place."""

    def __init__(self, *, stream: str, event_id: str, reason: str) -> None:
        self.stream = stream
        self.event_id = event_id
        super().__init__(f"append to {stream!r}: event id {event_id} {reason}")


class BatchTooLargeError(EventStoreError, ValueError):
    """An append carries more events than one atomic batch may hold."""

    def __init__(self, *, stream: str, size: int, limit: int) -> None:
        self.stream = stream
        self.size = size
        self.limit = limit
        super().__init__(
            f"append to {stream!r}: {size} events in one batch, the limit is {limit}; "
            f"split the append"
        )


class AtomicBatchUnsupportedError(EventStoreError):
    """The server cannot store several events atomically (nats-server older than 2.12)."""

    def __init__(self, *, stream: str, server_version: str) -> None:
        self.stream = stream
        self.server_version = server_version
        super().__init__(
            f"append to {stream!r}: several events need JetStream atomic batch publish "
            f"(nats-server >= 2.12), the server is {server_version}; nothing was written — "
            f"append one event per call or upgrade the server"
        )


class StoreUnavailableError(EventStoreError):
    """The store's server did not answer in time; the operation may be retried."""

    retryable = True

    def __init__(self, *, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"{operation}: event store unavailable: {reason}")


class ElectionTimeoutError(StoreUnavailableError):
    """JetStream stayed unavailable (no stream leader, no connection) for longer than the
    store's `election_timeout`, over every retry; waiting longer may still help."""

    def __init__(self, *, operation: str, seconds: float, attempts: int, last: str) -> None:
        self.seconds = seconds
        self.attempts = attempts
        self.last = last
        super().__init__(
            operation=operation,
            reason=f"{last}; still so after {seconds:g}s and {attempts} attempts (longer than "
            f"a leader election should take: election_timeout / FUSE_ELECTION_TIMEOUT); retry "
            f"later with the same event ids, a retry is never stored twice",
        )


class ReadInterruptedError(StoreUnavailableError):
    """A finite read lost its server for longer than the store's timeout; resume it later from
    `position + 1` (the events up to `position` were delivered)."""

    def __init__(self, *, operation: str, position: int, timeout: float, reason: str) -> None:
        self.position = position
        self.timeout = timeout
        super().__init__(
            operation=operation,
            reason=f"{reason}; gave up after {timeout:g}s at position {position} (the last "
            f"event delivered) — resume from position {position + 1}",
        )


class EventTooLargeError(EventStoreError, ValueError):
    """An event is larger than the store can take in one message (the NATS server's
    `max_payload`, headers included); nothing was sent."""

    def __init__(
        self, *, stream: str, event_id: str, size: int, limit: int, limit_name: str
    ) -> None:
        self.stream = stream
        self.event_id = event_id
        self.size = size
        self.limit = limit
        self.limit_name = limit_name
        super().__init__(
            f"append to {_shown(stream)}: event {_shown(event_id)} is {size} bytes, more than "
            f"{limit_name} of {limit} bytes; nothing was sent — keep large content elsewhere "
            f"(an object store, a file) and put a reference to it in the event"
        )


class StoreConnectionClosedError(EventStoreError):
    """The store's NATS connection is closed for good (closed by its owner, or by the server
    after a protocol error); nothing will reconnect it, so waiting cannot help."""

    def __init__(self, *, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(
            f"{operation}: the NATS connection of the event store is closed ({reason}); "
            f"it will not reconnect — open a new store"
        )


class ClientRefusedError(EventStoreError):
    """The NATS client refused a request before sending it (subject, header or size); the same
    request would be refused again."""

    def __init__(self, *, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"{operation}: the NATS client refused it before sending: {reason}")


class JetStreamRefusedError(EventStoreError):
    """JetStream answered a request (stream info, consumer create) with an error that waiting
    does not cure: the stream was deleted, or the request does not fit its configuration."""

    def __init__(self, *, operation: str, code: int, err_code: int, description: str) -> None:
        self.operation = operation
        self.code = code
        self.err_code = err_code
        self.description = description
        super().__init__(
            f"{operation}: JetStream refused it: {description} (status {code}, err_code "
            f"{err_code}); if the stream was deleted, open the store again to provision it"
        )


class StoreFileError(EventStoreError):
    """A SQLite store's file fails in a way waiting does not cure (cannot be created, damaged,
    not a database, no permission); the error says what to check."""

    def __init__(self, *, path: str, operation: str, reason: str, advice: str) -> None:
        self.path = path
        self.operation = operation
        self.reason = reason
        self.advice = advice
        super().__init__(f"{operation}: {reason}; {advice}")


class ReadOnlyStoreError(EventStoreError):
    """An append to a store opened read-only (its file or file system cannot be written)."""

    def __init__(self, *, store: str, reason: str) -> None:
        self.store = store
        self.reason = reason
        super().__init__(
            f"{store} is read-only ({reason}): it can be read and replayed, not appended to; "
            f"append to a writable copy of the file"
        )


class UnsupportedStoreError(EventStoreError, ValueError):
    """A store URL names a scheme no backend handles."""

    def __init__(self, *, url: str) -> None:
        self.url = url
        super().__init__(
            f"no event store backend for {url!r}; use nats://host:port, sqlite:///path/to/file.db "
            f"or sqlite://:memory:"
        )


class StoreClosedError(EventStoreError):
    """The store was used after close()."""

    def __init__(self, *, store: str) -> None:
        self.store = store
        super().__init__(self.message())

    def message(self) -> str:
        """The text of the error, from its attributes (subclasses say more)."""
        return f"{self.store} is closed"


class StoreNotFoundError(EventStoreError, LookupError):
    """A store opened only to read does not exist; opening it did not create it.

    `where` is the JetStream stream or the SQLite file looked for; `existing` what there is.
    """

    def __init__(self, *, where: str, existing: list[str], hint: str) -> None:
        self.where = where
        self.existing = existing
        found = ", ".join(existing) if existing else "none"
        super().__init__(f"no event store at {where} (there: {found}); {hint}")


class StreamNotFoundError(EventStoreError, LookupError):
    """No event is stored in this stream."""

    def __init__(self, *, stream: str) -> None:
        self.stream = stream
        super().__init__(
            f"no stream {stream!r}: no event is stored in it (`fuse streams list` shows those "
            "that exist)"
        )


class EventNotFoundError(EventStoreError, LookupError):
    """No stored event has this id or position."""

    def __init__(self, *, wanted: str) -> None:
        self.wanted = wanted
        super().__init__(
            f"no event with {wanted} in the store (`fuse replay` lists ids and positions)"
        )


class ClosedDuringAppendError(StoreClosedError):
    """The store was closed while an append waited for the server's acknowledgement."""

    def __init__(self, *, store: str, subject: str) -> None:
        self.subject = subject
        super().__init__(store=store)

    def message(self) -> str:
        """The text of the error, from its attributes."""
        return (
            f"{self.store} was closed while an append to {self.subject!r} waited for its "
            f"acknowledgement: the event may or may not be stored; open a store and retry with "
            f"the same event ids (retries are deduplicated)"
        )


# -- event store on JetStream (API error codes mapped in newfuse.nats.jserrors) --------------------


class StreamConfigError(EventStoreError):
    """The JetStream stream exists with a configuration newfuse cannot use; it is not changed."""

    def __init__(self, *, stream: str, field: str, wanted: object, actual: object) -> None:
        self.stream = stream
        self.field = field
        self.wanted = wanted
        self.actual = actual
        super().__init__(
            f"JetStream stream {stream!r} exists with {field}={actual!r}, newfuse needs "
            f"{wanted!r}; it was left unchanged — update it yourself (nats stream edit) or use "
            f"another prefix"
        )


class StreamCreateError(EventStoreError):
    """JetStream refused to create the events' stream; nothing was created.

    `advice` says what to do for the error code.
    """

    def __init__(
        self, *, stream: str, code: int, err_code: int, description: str, advice: str
    ) -> None:
        self.stream = stream
        self.code = code
        self.err_code = err_code
        self.description = description
        self.advice = advice
        super().__init__(
            f"JetStream could not create stream {stream!r}: {description} (status {code}, "
            f"err_code {err_code}); {advice}"
        )


class StreamCreateUnavailableError(StreamCreateError):
    """JetStream could not create the stream for a passing reason (no leader, peers offline)."""

    retryable = True


class PublishRejectedError(EventStoreError):
    """JetStream answered a publish with an API error that no more specific error covers."""

    def __init__(self, *, subject: str, code: int, err_code: int, description: str) -> None:
        self.subject = subject
        self.code = code
        self.err_code = err_code
        self.description = description
        super().__init__(self.message())

    def message(self) -> str:
        """The error's text, built from its attributes (subclasses say it their way)."""
        return (
            f"JetStream refused the publish to {self.subject!r}: {self.description} (status "
            f"{self.code}, err_code {self.err_code}); nothing was stored — check the stream's "
            f"configuration"
        )


class PublishUnavailableError(PublishRejectedError):
    """JetStream refused a publish for a passing reason (no leader, too many batches in flight,
    status 503/429); nothing was stored, and the same publish may succeed shortly."""

    retryable = True

    def message(self) -> str:
        return (
            f"JetStream cannot take the publish to {self.subject!r} now: {self.description} "
            f"(status {self.code}, err_code {self.err_code}); nothing was stored — retry shortly"
        )


class PublishTimeoutError(StoreUnavailableError):
    """No answer to a publish in time: the event may or may not be stored; retry with the same
    event ids (the retry is deduplicated)."""

    def __init__(self, *, subject: str, timeout: float) -> None:
        self.subject = subject
        self.timeout = timeout
        super().__init__(
            operation=f"publish to {subject!r}",
            reason=f"no acknowledgement within {timeout:g}s (the event may be stored; retry "
            f"with the same event ids, retries are deduplicated)",
        )


# -- event store on SQLite (every sqlite3.Error is mapped in newfuse.eventstore.sqlite) ----------


class CorruptStoreFileError(EventStoreError):
    """The SQLite event store's file is damaged, or is not an SQLite database at all."""

    def __init__(self, *, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"SQLite event store {path!r} cannot be read: {reason} — the file is damaged or not "
            f"an SQLite database; it was left as it is: restore it from a backup, or point the "
            f"store at another file"
        )


class ForeignStoreFileError(EventStoreError):
    """The file is an SQLite database, but not one of newfuse's event stores; it is not changed."""

    def __init__(self, *, path: str, found: str) -> None:
        self.path = path
        self.found = found
        super().__init__(
            f"{path!r} is an SQLite database but not a newfuse event store ({found}); it was "
            f"left unchanged — point the store at a new file, or at one newfuse created"
        )


class SQLiteStoreError(EventStoreError):
    """SQLite refused an operation for a reason that waiting does not cure (a constraint, a
    misuse, an internal error)."""

    def __init__(self, *, operation: str, path: str, reason: str) -> None:
        self.operation = operation
        self.path = path
        self.reason = reason
        super().__init__(
            f"{operation}: SQLite refused it ({reason}); nothing was written — check the file "
            f"with `sqlite3 {path} 'PRAGMA integrity_check'`, and report it if the file is sound"
        )


# -- projections -----------------------------------------------------------------------------------


class ProjectionError(FuseError):
    """Base of the errors of projections and their read models."""


class ReadModelUnavailableError(ProjectionError):
    """A read model's server (Redis, SQLite file) did not answer; the runner waits and resumes."""

    retryable = True

    def __init__(self, *, model: str, operation: str, reason: str) -> None:
        self.model = model
        self.operation = operation
        self.reason = reason
        super().__init__(f"{operation} on read model {model}: unavailable: {reason}")


class PartialBatchError(ProjectionError):
    """Redis refused a command inside a batch's MULTI/EXEC; Redis applied the rest of it."""

    def __init__(self, *, projection: str, generation: int, position: int, reason: str) -> None:
        self.projection = projection
        self.generation = generation
        self.position = position
        self.reason = reason
        super().__init__(
            f"projection {projection!r} (generation {generation}) stopped: Redis refused a "
            f"command of the batch ending at position {position} ({reason}) and, having no "
            f"rollback, applied the batch's other commands; fix the handler, then rebuild the "
            f"projection (fuse projections rebuild {projection})"
        )


class ProjectionStoppedError(ProjectionError):
    """A projection declared to stop on poison events met one; it stays at its checkpoint."""

    def __init__(self, *, projection: str, position: int, event_type: str, error: str) -> None:
        self.projection = projection
        self.position = position
        self.event_type = event_type
        self.error = error
        super().__init__(
            f"projection {projection!r} stopped at the {event_type!r} event at position "
            f"{position}: its handler kept failing ({error}); fix the handler and restart it, "
            f"or declare on_poison='skip' to dead-letter such events"
        )


class UnknownProjectionError(ProjectionError, LookupError):
    """No projection of that name is known."""

    def __init__(self, *, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            f"no projection named {name!r} (known: {', '.join(known) or 'none'}); check the name"
        )


class ProjectionTimeoutError(ProjectionError, TimeoutError):
    """A projection did not reach a position within the time allowed."""

    def __init__(self, *, projection: str, position: int, checkpoint: int, timeout: float) -> None:
        self.projection = projection
        self.position = position
        self.checkpoint = checkpoint
        self.timeout = timeout
        super().__init__(
            f"projection {projection!r} did not reach position {position} within {timeout:g}s "
            f"(its checkpoint is {checkpoint}); check its status for lag and errors"
        )


class RebuildConflictError(ProjectionError):
    """The active generation changed under a rebuild (another rebuild swapped first)."""

    def __init__(self, *, projection: str, expected: int, actual: int) -> None:
        self.projection = projection
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"rebuild of projection {projection!r}: the active generation is {actual}, not "
            f"{expected} as when the rebuild began (another rebuild swapped first); the new "
            f"generation was dropped — run the rebuild again if still needed"
        )


class ReadOnlyQueryError(ProjectionError):
    """A raw SQL query on a read-only connection tried to write, or failed."""

    def __init__(self, *, database: str, sql: str, reason: str) -> None:
        self.database = database
        self.sql = sql
        self.reason = reason
        super().__init__(f"query on {database} refused: {reason} (SQL: {sql.strip()[:200]})")


class QueryTimeoutError(ProjectionError):
    """A raw SQL query ran past its time limit and was stopped; the same query will again."""

    def __init__(self, *, database: str, sql: str, time_limit: float) -> None:
        self.database = database
        self.sql = sql
        self.time_limit = time_limit
        super().__init__(
            f"query on {database} stopped at its time limit of {time_limit:g}s "
            f"(SQL: {sql.strip()[:200]}); narrow it (WHERE, LIMIT) or allow more time "
            "(fuse audit sql --timeout SECONDS, or AuditIndex.sql(..., time_limit=SECONDS))"
        )


# -- agents ----------------------------------------------------------------------------------------


class AgentError(FuseError):
    """Base of the agent runtime's errors."""


class ConsumerCreateError(AgentError):
    """JetStream refused to create or update a durable consumer."""

    def __init__(
        self, *, stream: str, consumer: str, code: int, err_code: int, description: str
    ) -> None:
        self.stream = stream
        self.consumer = consumer
        self.code = code
        self.err_code = err_code
        self.description = description
        super().__init__(
            f"JetStream refused consumer {consumer!r} on stream {stream!r}: {description} "
            f"(status {code}, err_code {err_code}); instances of one agent type must declare "
            f"the same topics and delivery settings"
        )


class HandlerRegistrationError(AgentError, ValueError):
    """A handler cannot be registered as written."""

    def __init__(self, *, agent: str, message_type: str, reason: str) -> None:
        self.agent = agent
        self.message_type = message_type
        self.reason = reason
        super().__init__(f"agent {agent!r}: handler of {message_type!r}: {reason}")


class RequestTimeoutError(AgentError, TimeoutError):
    """No reply to a request within the time allowed (the request itself may be handled)."""

    retryable = True

    def __init__(self, *, agent: str, message_type: str, waited: float, path: str) -> None:
        self.agent = agent
        self.message_type = message_type
        self.waited = waited
        self.path = path
        super().__init__(
            f"no reply from agent {agent!r} to {message_type!r} within {waited:g}s ({path}); "
            f"is an instance running? (a request through the log stays in its inbox and is "
            f"handled when one starts)"
        )


class RequestFailedError(AgentError):
    """The agent answered a request with an error (its handler failed or gave up);
    `reply_id` is the event id of that answer when it came through the log."""

    def __init__(
        self, *, agent: str, message_type: str, error: str, reply_id: str | None = None
    ) -> None:
        self.agent = agent
        self.message_type = message_type
        self.error = error
        self.reply_id = reply_id
        super().__init__(f"agent {agent!r} failed {message_type!r}: {error}")


class AgentClosedError(AgentError):
    """The agent or client was used after it closed."""

    def __init__(self, *, agent: str) -> None:
        self.agent = agent
        super().__init__(f"{agent} is closed; open a new one")


class TaskNotFoundError(AgentError, LookupError):
    """No event of a task is stored on its subject."""

    def __init__(self, *, task_id: str, subject: str) -> None:
        self.task_id = task_id
        self.subject = subject
        super().__init__(
            f"no task {_shown(task_id)}: nothing is stored on {_shown(subject, 120)}; "
            f"`fuse tasks list` shows the tasks there are"
        )


class TaskAnswerRefusedError(AgentError):
    """A task cannot be answered: it does not wait for input, or nothing says who asked."""

    def __init__(self, *, task_id: str, state: str, reason: str) -> None:
        self.task_id = task_id
        self.state = state
        self.reason = reason
        super().__init__(f"task {_shown(task_id)} ({state}) cannot be answered: {reason}")


class DeadLetterNotFoundError(AgentError, LookupError):
    """No dead letter has the id asked for (or a prefix of it matches several)."""

    def __init__(self, *, letter_id: str, reason: str) -> None:
        self.letter_id = letter_id
        self.reason = reason
        super().__init__(
            f"dead letter {_shown(letter_id)}: {reason}; `fuse agents dead-letters` lists them"
        )


class DeadLetterReplayError(AgentError):
    """A dead letter's message cannot be sent again (gone from the stream, or never one)."""

    def __init__(self, *, letter_id: str, position: int, reason: str) -> None:
        self.letter_id = letter_id
        self.position = position
        self.reason = reason
        super().__init__(
            f"cannot replay dead letter {_shown(letter_id)} (message at position {position}): "
            f"{reason}"
        )


class AgentConfigError(AgentError, ValueError):
    """An Agent is declared with a setting the runtime cannot use (a version that is not
    semantic, a heartbeat interval that is not positive)."""

    def __init__(self, *, agent: str, field: str, value: object, reason: str) -> None:
        self.agent = agent
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"agent {agent!r}: {field}={value!r}: {reason}")


class AggregateConfigError(AgentError, ValueError):
    """A scatter/gather is asked for with agents, a strategy or a quorum it cannot use."""

    def __init__(self, *, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"aggregate: {field}={_shown(repr(value), 120)}: {reason}")


class MicroServiceConfigError(FuseError, ValueError):
    """A NATS micro service (ADR-32) cannot be declared as asked."""

    def __init__(self, *, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"micro service {field} {value!r}: {reason}")


# -- reliability -----------------------------------------------------------------------------------


class ReliabilityConfigError(FuseError, ValueError):
    """A retry policy, circuit breaker or rate limiter is declared with a value it cannot use."""

    def __init__(self, *, what: str, field: str, value: object, reason: str) -> None:
        self.what = what
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{what}: {field}={value!r}: {reason}")


class RetriesExhaustedError(FuseError):
    """A retried operation failed every attempt, or its deadline passed; the last error is the
    cause (`__cause__`) and is named in the message. Not retryable: the retrying is done."""

    def __init__(
        self, *, operation: str, attempts: int, elapsed: float, last_error: str, reason: str
    ) -> None:
        self.operation = operation
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error
        self.reason = reason
        tries = "attempt" if attempts == 1 else "attempts"
        super().__init__(
            f"{operation}: gave up after {attempts} {tries} in {elapsed:.3g}s ({reason}); "
            f"last error: {last_error}"
        )


class CircuitOpenError(FuseError):
    """A circuit breaker refused a call: the circuit is open (or half-open with its trial calls
    taken). Retryable: `retry_after` says when it lets a trial call through."""

    retryable = True

    def __init__(self, *, name: str, state: str, failures: int, retry_after: float) -> None:
        self.name = name
        self.state = state
        self.failures = failures
        self.retry_after = retry_after
        if state == "half-open":
            when = "its trial calls are under way; try again when they end"
        else:
            when = f"calls are refused for {retry_after:.3g}s more, then a trial call goes through"
        super().__init__(f"circuit {_shown(name)} is {state} after {failures} failures; {when}")


class RateLimitExceededError(FuseError):
    """A rate limiter cannot grant what was asked: more tokens than its burst holds."""

    def __init__(self, *, limiter: str, tokens: int, burst: int) -> None:
        self.limiter = limiter
        self.tokens = tokens
        self.burst = burst
        super().__init__(
            f"rate limiter {limiter}: {tokens} tokens asked at once, but its bucket holds at most "
            f"{burst}; ask for fewer per call or raise the burst"
        )


class TaskSubmitError(AgentError, ValueError):
    """A task cannot be submitted as asked (a priority outside 0-9, a deadline in the past,
    max attempts outside the queue's range)."""

    def __init__(self, *, queue: str, field: str, value: object, reason: str) -> None:
        self.queue = queue
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"submit to queue {_shown(queue)}: {field}={value!r}: {reason}")


class TaskQueueUnknownError(AgentError, LookupError):
    """A queued task's subject names its queue, and the queue of this task is not known here
    (an identity that may read only its own subjects cannot look it up)."""

    def __init__(self, *, task_id: str, identity: str) -> None:
        self.task_id = task_id
        self.identity = identity
        super().__init__(
            f"task {_shown(task_id)}: its queue is not known to this TaskQueue, and identity "
            f"{_shown(identity)} may read only the subjects of its own tasks: pass queue="
        )


class TaskAttemptsError(AgentError):
    """A queued task failed on its last allowed attempt; the last error is kept (it becomes the
    dead letter's error and the failed status's text). Not retryable: the attempts are spent."""

    def __init__(self, *, task_id: str, attempts: int, last_error: str) -> None:
        self.task_id = task_id
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(
            f"task {_shown(task_id)} failed {attempts} attempt(s), the most it allows; "
            f"last error: {last_error}"
        )


class TaskWaitTimeoutError(AgentError, TimeoutError):
    """A task had not ended when the time to wait for it ran out (it may still end)."""

    retryable = True

    def __init__(self, *, task_id: str, state: str, waited: float) -> None:
        self.task_id = task_id
        self.state = state
        self.waited = waited
        super().__init__(
            f"task {_shown(task_id)} is still {state} after {waited:g}s; `fuse queues list` "
            f"shows whether its queue has workers, `fuse tasks show` what it went through"
        )


# -- sagas ---------------------------------------------------------------------------------------


class SagaError(FuseError):
    """Base of the errors of sagas (definitions, orchestrators)."""


class SagaDefinitionError(SagaError, ValueError):
    """A saga is defined in a way the orchestrator cannot run (a step twice, no such step)."""

    def __init__(self, *, saga: str, reason: str) -> None:
        self.saga = saga
        self.reason = reason
        super().__init__(f"saga {saga!r}: {reason}")


class UnknownSagaError(SagaError, LookupError):
    """An orchestrator was asked to start or drive a saga whose definition it does not have."""

    def __init__(self, *, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            f"no saga definition {name!r} in this orchestrator (it has "
            f"{', '.join(known) or 'none'}): pass it in `sagas=`"
        )


class SagaNotFoundError(SagaError, LookupError):
    """No saga with this id has events."""

    def __init__(self, *, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(f"no saga {_shown(saga_id)}: its stream saga.<id> has no events")


class SagaTimeoutError(SagaError, TimeoutError):
    """A saga had not ended when the time to wait for it ran out (it may still end)."""

    retryable = True

    def __init__(self, *, saga_id: str, status: str, waited: float) -> None:
        self.saga_id = saga_id
        self.status = status
        self.waited = waited
        super().__init__(
            f"saga {_shown(saga_id)} is still {status} after {waited:g}s; `fuse sagas show` "
            f"tells which step it is at"
        )


class SagaNotStuckError(SagaError):
    """A person tried to resolve a saga that is not stuck (it never was, or someone resolved
    it first)."""

    def __init__(self, *, saga_id: str, status: str, resolved_by: str | None = None) -> None:
        self.saga_id = saga_id
        self.status = status
        self.resolved_by = resolved_by
        by = f" ({resolved_by} resolved it)" if resolved_by else ""
        super().__init__(
            f"saga {_shown(saga_id)} is {status}{by}, not stuck: only a stuck saga is "
            f"resolved; `fuse sagas show` tells where it is"
        )


class StepTaskFailedError(SagaError):
    """A saga step's queued task ended without a result (failed, canceled, rejected). Not
    retryable: the step's task is submitted once, so another attempt finds the same end."""

    def __init__(self, *, queue: str, task_id: str, state: str, reason: str) -> None:
        self.queue = queue
        self.task_id = task_id
        self.state = state
        self.reason = reason
        super().__init__(
            f"task {_shown(task_id)} on queue {_shown(queue)} ended {state}: {reason}; "
            f"`fuse tasks show` tells what it went through"
        )


class InvalidTimerError(SagaError, ValueError):
    """A timer message (one to set, or a fire read back) is not one newfuse can use: too big,
    not JSON of the timer's shape, or on a subject that is not its key's. A fire like that is
    logged and dropped; retrying cannot help."""

    def __init__(self, *, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(self.message())

    def message(self) -> str:
        """The error's text."""
        return f"timer message {self.where}: {self.reason}; it is dropped"


class TimerSetupError(SagaError):
    """The timers could not be set up on the server (stream or consumer refused)."""

    def __init__(self, *, stream: str, reason: str) -> None:
        self.stream = stream
        self.reason = reason
        super().__init__(self.message())

    def message(self) -> str:
        """The error's text."""
        return (
            f"timers on JetStream stream {self.stream!r}: {self.reason}; on a server without "
            f"message scheduling (before 2.12) use the in-process timers (MemoryTimers)"
        )


# -- human review and feedback ---------------------------------------------------------------------


class ReviewError(FuseError):
    """Base of the errors of human reviews and feedback."""


class ReviewNotFoundError(ReviewError, LookupError):
    """No review with this id has been requested."""

    def __init__(self, *, review_id: str) -> None:
        self.review_id = review_id
        super().__init__(
            f"no review {_shown(review_id)}: its stream review.<id> has no request; "
            f"`fuse review list` shows the reviews there are"
        )


class ReviewDecidedError(ReviewError):
    """A review was decided already (by another reviewer, or by its deadline): this decision,
    claim or edit was not stored."""

    def __init__(self, *, review_id: str, status: str, by: str, at: str) -> None:
        self.review_id = review_id
        self.status = status
        self.by = by
        self.at = at
        super().__init__(f"review {_shown(review_id)} was {status} by {by} at {at}; nothing stored")


class ReviewClaimedError(ReviewError):
    """A review is claimed by another reviewer, who alone may edit or decide it."""

    def __init__(self, *, review_id: str, by: str, wanted: str) -> None:
        self.review_id = review_id
        self.by = by
        self.wanted = wanted
        super().__init__(
            f"review {_shown(review_id)} is claimed by {by}: {wanted} cannot decide or edit it"
        )


class ReviewerNotAllowedError(ReviewError):
    """The reviewer names none of the groups the review says may decide it."""

    def __init__(
        self,
        *,
        review_id: str,
        reviewer: str,
        groups: list[str],
        allowed: list[str],
        hint: str | None = None,
    ) -> None:
        self.review_id = review_id
        self.reviewer = reviewer
        self.groups = groups
        self.allowed = allowed
        super().__init__(
            f"review {_shown(review_id)} is decided by group {' or '.join(allowed)}; "
            f"{reviewer} acts for {', '.join(groups) or 'no group'} "
            f"({hint or 'give --group or $FUSE_REVIEWER_GROUPS'})"
        )


class ReviewerIdentityError(ReviewError):
    """On a bus whose store checks signatures, a decision counts only when the reviewer it
    names signed it: the reviewer given is not who this connection signs as, or names a group
    their certificate does not, or the connection signs nothing."""

    def __init__(self, *, reviewer: str, signed_as: str | None, reason: str) -> None:
        self.reviewer = reviewer
        self.signed_as = signed_as
        self.reason = reason
        shown = _shown(signed_as) if signed_as is not None else "no one"
        super().__init__(
            f"reviewer {_shown(reviewer)}, signed as {shown}: {reason}; nothing stored"
        )


class ReviewInputError(ReviewError, ValueError):
    """What a person gives is not what it should be: an edited input that is no JSON object or
    too big, a rejection or resolution without a comment, a feedback score out of range."""

    def __init__(self, *, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class TransactionViewError(SagaError):
    """The `transactions` projection cannot keep a saga's row: the saga's fold would be larger
    than the row allows, or the row stored earlier no longer decodes (a newer SagaState after
    an upgrade: rebuild the projection). The event is dead-lettered; the log is unchanged."""

    def __init__(self, *, saga_id: str, position: int, reason: str) -> None:
        self.saga_id = saga_id
        self.position = position
        self.reason = reason
        super().__init__(
            f"transactions view of saga {_shown(saga_id)} at position {position}: {reason}"
        )


# -- model providers -------------------------------------------------------------------------------


class ModelError(FuseError):
    """Base of the errors of model providers (LLM endpoints and local models)."""


class ModelRequestError(ModelError):
    """The model server refused the request as asked (400, 401, 403, 404, 422): a wrong model
    name, key or parameter; sending it again will not help."""

    def __init__(self, *, provider: str, url: str, status: int, detail: str) -> None:
        self.provider = provider
        self.url = url
        self.status = status
        self.detail = detail
        super().__init__(self.message())

    def message(self) -> str:
        """The error's text; subclasses with other facts say it their way."""
        hint = {
            401: "check the API key",
            403: "check the API key's permissions",
            404: "check the base URL (it ends in /v1) and the model name",
        }.get(self.status, "check the model name and parameters")
        return (
            f"{self.provider} at {self.url} refused the request (HTTP {self.status}): "
            f"{_shown(self.detail, 300)}; {hint}"
        )


class ModelUnavailableError(ModelError):
    """The model server is overloaded, failing or unreachable (429, 5xx, a timeout, a refused
    connection); a later attempt may succeed, after `retry_after` seconds when it said so."""

    retryable = True

    def __init__(
        self,
        *,
        provider: str,
        url: str,
        reason: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.provider = provider
        self.url = url
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        super().__init__(self.message())

    def message(self) -> str:
        """The error's text; subclasses with other facts say it their way."""
        status = f" (HTTP {self.status})" if self.status is not None else ""
        wait = f"; it asks to wait {self.retry_after:g}s" if self.retry_after is not None else ""
        return f"{self.provider} at {self.url}{status}: {self.reason}{wait}"


class ModelRateLimitedError(ModelUnavailableError):
    """The model server said too many requests (429)."""


class ModelResponseError(ModelError):
    """The model server answered with something that is not a chat completion (not JSON, too
    large, too deeply nested, a field of the wrong type): it is not used."""

    def __init__(self, *, provider: str, url: str, reason: str) -> None:
        self.provider = provider
        self.url = url
        self.reason = reason
        super().__init__(f"{provider} at {url} answered with no usable chat completion: {reason}")


class ModelRecordError(ModelError):
    """A `model.invoked` record stored in the background was not stored (no PubAck in time, the
    stream refused it or is unavailable). The call itself was answered; what depends on its
    record (the handler's outcome) is not committed, so the message is delivered again."""

    retryable = True

    def __init__(self, *, subject: str, call: int | None, reason: str) -> None:
        self.subject = subject
        self.call = call
        self.reason = reason
        super().__init__(self.message())

    def message(self) -> str:
        """The error's text; subclasses with other facts say it their way."""
        which = f"model call {self.call}" if self.call is not None else "a model call"
        return (
            f"the record of {which} was not stored on {self.subject!r}: {_shown(self.reason, 300)}"
            "; the outcome that depends on it is not committed (it is tried again)"
        )


class ModelReplayError(ModelError):
    """A replay cannot answer a model call from the log: the handler made more calls than were
    recorded (its code or input changed); the replay of that message stops there."""

    def __init__(self, *, message_id: str, call: int, recorded: int) -> None:
        self.message_id = message_id
        self.call = call
        self.recorded = recorded
        super().__init__(
            f"replay of message {_shown(message_id)}: model call {call} has no recorded result "
            f"({recorded} call(s) recorded); replay with --provider to answer new calls"
        )


# -- security ----------------------------------------------------------------------------------


class SecurityError(FuseError):
    """Base of the errors of identities, keys, signatures and the audit trail."""


class KeyFileError(SecurityError, ValueError):
    """A key file cannot be used: missing, unreadable, malformed, or readable by others."""

    def __init__(self, *, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        where = f"key file {path}" if path else "key"
        super().__init__(f"{where}: {reason}")


class SignedNoteError(SecurityError, ValueError):
    """A signed note (an audit checkpoint) is malformed or signed by no trusted key."""

    def __init__(self, *, reason: str) -> None:
        self.reason = reason
        super().__init__(f"signed note: {reason}")


class IdentityError(SecurityError, ValueError):
    """An identity cannot be created, found or used as asked."""

    def __init__(self, *, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"identity {_shown(name)}: {reason}")


class PermissionDeniedError(SecurityError):
    """The NATS server refused an operation: this identity may not publish or subscribe there.
    Retrying does not help; the identity's permissions (`fuse auth`) decide."""

    def __init__(self, *, identity: str, operation: str, subject: str) -> None:
        self.identity = identity
        self.operation = operation
        self.subject = subject
        super().__init__(
            f"permission denied: identity {_shown(identity)} may not {operation} "
            f"{_shown(subject, 200)} (the server refused it; see `fuse auth list`)"
        )


class MessageDeniedError(RequestFailedError, SecurityError):
    """The receiving agent's message policy (`Agent(accepts=...)`) does not accept this message
    type from this sender: the message was not handled. Retrying does not help; the receiver's
    policy decides. `sender` is the identity that signed the request (on a secured bus), else
    the sender it claimed; `reason` says what the receiver accepts from it."""

    def __init__(
        self,
        *,
        sender: str,
        message_type: str,
        receiver: str,
        reason: str,
        reply_id: str | None = None,
    ) -> None:
        self.receiver = receiver
        self.sender = sender
        self.reason = reason
        super().__init__(
            agent=receiver,
            message_type=message_type,
            error=f"message denied: {_shown(sender)} may not send {_shown(message_type)} "
            f"({reason}; see its `accepts` policy)",
            reply_id=reply_id,
        )


class UntrustedServerError(SecurityError):
    """The NATS server's TLS certificate was not signed by the CA the client trusts, names
    another host, or the server offers no TLS where TLS was asked for. Not retryable: the
    certificate (or the CA given) has to change, not the timing."""

    def __init__(self, *, url: str, ca: str | None, reason: str) -> None:
        self.url = url
        self.ca = ca
        self.reason = reason
        trusted = f"the CA in {ca}" if ca else "the system's CAs (no CA given)"
        super().__init__(
            f"nats-server at {url} is not trusted with {trusted}: {reason}; give the CA "
            "certificate that signed the server's (--ca, FUSE_NATS_CA, or `ca` in the "
            "credentials file)"
        )


class KeyServiceError(SecurityError):
    """The key service (security/key_service.py) did not seal or open what an agent asked:
    `operation` is `seal` or `open`, `code` the answer's ADR-32 error code (400 a malformed
    request, 403 refused, 404 no such message, 500 its own failure, 503 no answer)."""

    def __init__(self, *, operation: str, code: int, reason: str) -> None:
        self.operation = operation
        self.code = code
        self.reason = reason
        super().__init__(f"key service, {operation} ({code}): {reason}")


class KeyServiceRefusedError(KeyServiceError):
    """The key service will not open these fields for this requester (it is neither the
    message's recipient nor its sender, or it cannot be told who asks). Retrying does not help."""


class KeyServiceUnavailableError(KeyServiceError):
    """No key service answered in time (none runs, or it is restarting): nothing was sealed or
    opened, and no field was given to a handler redacted instead. Trying again later may help."""

    retryable = True

    def __init__(self, *, operation: str, subject: str, reason: str) -> None:
        self.subject = subject
        super().__init__(
            operation=operation,
            code=503,
            reason=f"no answer on {subject} ({reason}); is a key service running (`fuse dev` "
            "runs one; in Python newfuse.security.KeyService)?",
        )


class KeyServiceBusyError(KeyServiceError):
    """The key service answered that it cannot serve this now: the requester asks too often
    (429), or its key store or the message stream did not answer it (503). Trying again
    later may help."""

    retryable = True
