"""Sealed fields in A2A messages, through the key service (the agent never holds a key).

A payload struct that declares `Personal()` / `Secret()` fields (schemas/sealed.py) has them
sealed before its message is stored: the key service (security/key_service.py) seals each
value for the event id and the path `$.payload.<field>`, with the key of the struct's
`DataSubject()` field (else of the message's stream, `a2a.<type>`). A received message whose
body holds a sealed value is opened by the key service from the stored copy at its position
before the handler sees it; a field whose subject was forgotten reads as the replacement the
handler's struct declares for it (else null), and `Context.redacted` lists it. A reader of the
log that holds the keys itself (an admin's `fuse agents history`) opens them with its own
cipher (`open_held`); without keys, or once forgotten, they read as `REDACTED`.

Messages without sealed fields pay one `isinstance` when sent and one substring search when
received. The fast path (`call`) stores nothing, so nothing could be opened: a sealed payload
is refused there.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from newfuse.errors import (
    FuseError,
    InvalidPayloadError,
    KeyNotLoadedError,
    KeyServiceError,
    SealedValueError,
)
from newfuse.schemas import (
    MAX_SUBJECT_CHARS,
    REDACTED,
    A2AMessage,
    FieldCipher,
    SealedValue,
    check_depth,
)
from newfuse.schemas.sealed import ALGORITHM, SealPlan, names_a_subject, seal_plan
from newfuse.security.key_service import PAYLOAD_PATH, KeyServiceClient, SealField

SEALED_MARK: Final = ALGORITHM.encode()
"""In the body of every message that holds a sealed value (its `enc`): what is looked for."""

_PLANS: dict[type, SealPlan | None] = {}
_ENCODE: Final = msgspec.json.Encoder()


_SEALED_KEYS: Final = frozenset(SealedValue.__struct_fields__)


def _has_form(value: object) -> bool:
    """Whether `value` (decoded JSON) has the members of a sealed value, `enc` A256GCM."""
    return (
        isinstance(value, dict) and value.get("enc") == ALGORITHM and value.keys() == _SEALED_KEYS
    )


def holds_sealed(message: A2AMessage) -> bool:
    """Whether a top-level value of `message`'s payload has a sealed value's form (asked only
    of a body holding `SEALED_MARK`: a payload that merely mentions the word is not sent to the
    key service)."""
    return any(_has_form(value) for value in message.payload.values())


async def open_held(
    cipher: FieldCipher | None,
    message: A2AMessage,
    event_id: str,
    *,
    replacement: Any = REDACTED,
    payload_type: Any = None,
) -> tuple[A2AMessage, tuple[str, ...]]:
    """`message` (of event `event_id`) with the sealed values of its payload opened by a
    reader that holds the keys itself, and the paths that read as their replacement:
    forgotten, or every one when `cipher` is None (a reader without keys, as the event store
    reads them). The replacement is the one `payload_type` (a handler's struct) declares for
    the field, else `replacement`.

    A value of a sealed value's form whose members are not all strings is not one, and stays.

    Raises:
        SealedValueError: a value does not open (moved from another event or field, altered)
            or opens to something that is not JSON.
    """
    payload = dict(message.payload)
    redacted: list[str] = []
    opened = False
    plan = plan_of_type(payload_type) if payload_type is not None else None
    declared = {f.wire: f.replacement for f in (plan.fields if plan else ())}
    for name, value in message.payload.items():
        if not _has_form(value):
            continue
        try:
            sealed = msgspec.convert(value, SealedValue)
        except msgspec.ValidationError:
            continue  # not a sealed value by its form: not ours to open
        path = PAYLOAD_PATH + name
        opened = True
        plaintext = None
        if cipher is not None:
            try:
                plaintext = cipher.decrypt(sealed, event_id, path)
            except KeyNotLoadedError:
                await cipher.fetch([(sealed.sub, sealed.kid)])  # it opens or is known forgotten
                plaintext = cipher.decrypt(sealed, event_id, path)
        if plaintext is None:
            payload[name] = msgspec.json.decode(declared[name]) if name in declared else replacement
            redacted.append(path)
            continue
        payload[name] = _plaintext(plaintext, event_id, path)
    if not opened:
        return message, ()
    return msgspec.structs.replace(message, payload=payload), tuple(redacted)


def _plaintext(data: bytes, event_id: str, path: str) -> Any:
    """The JSON value a sealed value opened to (what any agent sealed: checked as foreign).

    Raises:
        SealedValueError: it is not JSON, or nests deeper than the wire contract allows.
    """
    try:
        check_depth(data, f"event {event_id}")
        return msgspec.json.decode(data)
    except (FuseError, msgspec.DecodeError) as error:
        raise SealedValueError(
            event_id=event_id, path=path, reason=f"it opens to no usable JSON ({error})"
        ) from None


def plan_of(payload: Any) -> SealPlan | None:
    """The sealed fields `payload`'s struct declares; None for any other payload (a dict)."""
    if not isinstance(payload, msgspec.Struct):
        return None
    return plan_of_type(type(payload))


def plan_of_type(cls: type) -> SealPlan | None:
    """The sealed fields the struct `cls` declares (None: none, or not a struct).

    Raises:
        InvalidPayloadError: a declaration is unusable (the reason names the field).
    """
    try:
        return _PLANS[cls]
    except KeyError:
        pass
    plan = None
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        try:
            plan = seal_plan(cls.__qualname__, 1, cls)
        except ValueError as error:
            raise InvalidPayloadError(
                type_name=cls.__qualname__, version=1, path="$.payload", reason=str(error)
            ) from None
    _PLANS[cls] = plan
    return plan


async def seal_message(
    keys: KeyServiceClient, message: A2AMessage, plan: SealPlan, stream: str
) -> A2AMessage:
    """`message` with the fields `plan` declares sealed by the key service (absent or null
    fields stay as they are).

    Raises:
        InvalidPayloadError: a field's data subject is not a usable name.
        KeyServiceUnavailableError, KeyServiceError: from the key service.
    """
    payload = message.payload
    fields: list[SealField] = []
    for field in plan.fields:
        value = payload.get(field.wire)
        if value is None:
            continue
        subject = stream if field.subject is None else payload.get(field.subject)
        if not names_a_subject(subject):
            raise InvalidPayloadError(
                type_name=message.type,
                version=1,
                path=f"{PAYLOAD_PATH}{field.subject}",
                reason=f"it names the data subject of `{PAYLOAD_PATH}{field.wire}`: a non-empty "
                f"printable string of at most {MAX_SUBJECT_CHARS} characters, got {subject!r:.80}",
            )
        path = PAYLOAD_PATH + field.wire
        raw = msgspec.Raw(_ENCODE.encode(value))
        fields.append(SealField(path=path, subject=subject, value=raw))
    if not fields:
        return message
    sealed = await keys.seal(message.message_id or "", fields)
    opened = dict(payload)
    for asked, value in zip(fields, sealed, strict=True):
        opened[asked.path[len(PAYLOAD_PATH) :]] = msgspec.to_builtins(value)
    return msgspec.structs.replace(message, payload=opened)


async def open_message(
    keys: KeyServiceClient,
    message: A2AMessage,
    *,
    event_id: str,
    position: int,
    payload_type: Any,
    subject: str | None = None,
    requester: str | None = None,
) -> tuple[A2AMessage, tuple[str, ...]]:
    """`message` (stored at `position`; with `subject`, on that subject at or after it) with
    its sealed values opened by the key service, and the paths that read as their
    replacement (forgotten). A forgotten field takes the replacement `payload_type` (the
    handler's struct) declares for it, else null.

    Raises:
        KeyServiceRefusedError: this identity may not open it.
        KeyServiceUnavailableError, KeyServiceError: from the key service.
    """
    if subject is None:
        reply = await keys.open(position, requester=requester)
    else:
        reply = await keys.open(position, subject=subject, event=event_id, requester=requester)
    if reply.event != event_id:
        raise KeyServiceError(
            operation="open",
            code=409,
            reason=f"position {position} holds event {reply.event!r:.80}, not {event_id!r}",
        )
    if not reply.values:
        return message, ()
    plan = plan_of_type(payload_type)
    replacements = {PAYLOAD_PATH + f.wire: f.replacement for f in (plan.fields if plan else ())}
    payload = dict(message.payload)
    for path, raw in reply.values.items():
        if not path.startswith(PAYLOAD_PATH):
            continue
        data = replacements.get(path, b"null") if path in reply.redacted else bytes(raw)
        payload[path[len(PAYLOAD_PATH) :]] = _plaintext(data, event_id, path)
    return msgspec.structs.replace(message, payload=payload), tuple(reply.redacted)
