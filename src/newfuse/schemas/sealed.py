"""Payload fields sealed per data subject: how a struct declares them, their wire form, and the
plan a store follows to seal them on append and open them on read.

A field is declared with `Annotated[<type>, Personal()]` (or `Secret()`); the subject whose key
seals it is the struct's `Annotated[str, DataSubject()]` field, else the event's stream. On the
wire such a field holds a `SealedValue` object instead of its value; the AEAD cipher and the
keys are not here (newfuse.security); this module only moves JSON and calls a `FieldCipher`.
"""

from __future__ import annotations

import binascii
import typing
from collections.abc import Iterable
from typing import Any, Final, Literal, Protocol, TypeGuard

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow

SEALED_KEY: Final = "newfuse.sealed"
"""Key of a field's `msgspec.Meta.extra` that declares it sealed (or the data subject)."""

SCHEMA_MARK: Final = "x-newfuse-sealed"
"""Key the exported JSON Schema puts on a sealed property (kind, subject, plaintext schema)."""

ALGORITHM: Final = "A256GCM"
"""The `enc` of a sealed value: AES-256-GCM, 12-byte nonce, 16-byte tag after the ciphertext."""

REDACTED: Final = "[redacted]"
"""What a forgotten `str` field reads as, unless its declaration names another replacement."""

MAX_SUBJECT_CHARS: Final = 256
"""Longest data subject id (it names a key in the key store)."""

Kind = Literal["personal", "secret"]


def names_a_subject(value: object) -> TypeGuard[str]:
    """Whether `value` can name a data subject: a non-empty printable string of at most
    `MAX_SUBJECT_CHARS` characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_SUBJECT_CHARS and value.isprintable()


_UNSET: Final[Any] = object()


def Personal(*, subject: str | None = None, replacement: Any = _UNSET) -> msgspec.Meta:
    """Declare a payload field as personal data: sealed with its data subject's key.

    Args:
        subject: the attribute name of the (string) field naming the data subject; default:
            the struct's `DataSubject()` field, else the event's stream.
        replacement: what the field reads as once the subject is forgotten; default None when
            the type allows it, else `REDACTED` for a string (other types must give one).
    """
    return _declare("personal", subject, replacement)


def Secret(*, subject: str | None = None, replacement: Any = _UNSET) -> msgspec.Meta:
    """Declare a payload field secret (a token, a credential): sealed like `Personal`."""
    return _declare("secret", subject, replacement)


def DataSubject() -> msgspec.Meta:
    """Declare the (string) field whose value names the data subject of the sealed fields."""
    return msgspec.Meta(
        extra={SEALED_KEY: {"role": "subject"}},
        extra_json_schema={SCHEMA_MARK: {"role": "data-subject"}},
    )


def _declare(kind: Kind, subject: str | None, replacement: Any) -> msgspec.Meta:
    spec = {"role": "sealed", "kind": kind, "subject": subject, "replacement": replacement}
    return msgspec.Meta(extra={SEALED_KEY: spec}, extra_json_schema={SCHEMA_MARK: {"kind": kind}})


class SealedValue(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The wire form of a sealed field: `{"enc", "sub", "kid", "iv", "ct"}`.

    Attributes:
        enc: the algorithm, `A256GCM`.
        sub: the data subject whose key sealed it.
        kid: the id of that key (a subject forgotten and seen again gets a new key and id).
        iv: the 12-byte nonce, base64url without padding.
        ct: ciphertext and 16-byte tag of the value's JSON, base64url without padding.

    The associated data (authenticated, not sent) binds it to its place:
    `newfuse-sealed/1 NUL <event id> NUL <field path> NUL <sub> NUL <kid>`, so a value moved to
    another event or field, or given another subject or key id, fails to open.
    """

    enc: Literal["A256GCM"]
    sub: str
    kid: str
    iv: str
    ct: str


SEALED_DECODER: Final = msgspec.json.Decoder(SealedValue)
_decode_sealed: Final = SEALED_DECODER.decode


def associated_data(event_id: str, path: str, subject: str, kid: str) -> bytes:
    """The AEAD associated data of a sealed value (see `SealedValue`)."""
    return f"newfuse-sealed/1\0{event_id}\0{path}\0{subject}\0{kid}".encode()


_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


def b64(raw: bytes) -> str:
    """base64url without padding (the `iv` and `ct` of a sealed value)."""
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """The bytes of base64url text with or without padding; ValueError when it is not.

    (binascii straight, strict: base64.urlsafe_b64decode cost a fifth of opening a field.)
    """
    raw = text.encode("ascii").translate(_FROM_URLSAFE)
    return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4), strict_mode=True)


class FieldCipher(Protocol):
    """What a store calls to seal and open fields: keys cached, so both calls are synchronous.

    `load` (async) fetches, or with `create` makes, the current keys of subjects before a
    seal; `fetch` settles keys an open said were not loaded: afterwards each (subject, key id)
    either opens or is known forgotten.
    """

    async def load(self, subjects: Iterable[str], *, create: bool) -> None: ...

    async def fetch(self, missing: Iterable[tuple[str, str]]) -> None: ...

    async def close(self) -> None:
        """Called when the store closes (a cipher that owns its key store closes it)."""
        ...

    def encrypt(self, subject: str, plaintext: bytes, event_id: str, path: str) -> SealedValue:
        """Seal `plaintext` with the subject's loaded key, bound to (event id, field path)."""
        ...

    def decrypt(self, value: SealedValue, event_id: str, path: str) -> bytes | None:
        """The plaintext, or None when the key is forgotten.

        Raises:
            KeyNotLoadedError: the cache does not know the key yet (call `load`, then again).
            SealedValueError: the value does not open (moved, tampered, not base64).
        """
        ...


class SealedField(msgspec.Struct, frozen=True, kw_only=True):
    """One sealed field of a payload struct, as its plan needs it."""

    attr: str
    wire: str
    path: str
    kind: Kind
    subject: str | None  # wire name of its subject field; None: the event's stream
    replacement: bytes  # JSON of the value it reads as once forgotten


class Opened(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A payload with its sealed fields opened: the plaintext JSON, and the fields that read as
    their replacement because the subject's key is forgotten."""

    data: bytes
    redacted: tuple[str, ...] = ()


class SealPlan:
    """How to seal and open the fields one payload struct declares sealed."""

    def __init__(self, type_name: str, version: int, fields: tuple[SealedField, ...]) -> None:
        self.type_name = type_name
        self.version = version
        self.fields = fields
        self.subject_fields = tuple(sorted({f.subject for f in fields if f.subject is not None}))
        members: list[tuple[str, Any, Any]] = [(f.wire, msgspec.Raw, msgspec.Raw()) for f in fields]
        members += [(name, Any, None) for name in self.subject_fields]
        self._probe = msgspec.json.Decoder(msgspec.defstruct("_Sealed", members, kw_only=True))

    def _subject(self, found: Any, field: SealedField, stream: str) -> str:
        if field.subject is None:
            return stream
        value = getattr(found, field.subject)
        if not names_a_subject(value):
            raise ValueError(
                f"`$.{field.subject}` names the data subject of `{field.path}`: it must be a "
                f"non-empty printable string of at most {MAX_SUBJECT_CHARS} characters, "
                f"got {value!r:.80}"
            )
        return value

    def subjects(self, data: bytes, stream: str) -> set[str]:
        """The data subjects a payload's sealed fields belong to (ValueError when one is bad)."""
        found = self._probe.decode(data)
        return {self._subject(found, f, stream) for f in self.fields if getattr(found, f.wire)}

    def seal(self, data: bytes, event_id: str, stream: str, cipher: FieldCipher) -> bytes:
        """`data` (plaintext payload JSON) with each sealed field replaced by its SealedValue;
        a field that is absent or null stays as it is. Subjects were checked by `subjects`."""
        doc = msgspec.json.decode(data)
        for field in self.fields:
            value = doc.get(field.wire)
            if value is None:
                continue
            subject = stream if field.subject is None else doc[field.subject]
            doc[field.wire] = cipher.encrypt(subject, _ENCODER.encode(value), event_id, field.path)
        return _ENCODER.encode(doc)

    def open(self, data: bytes, event_id: str, stream: str, cipher: FieldCipher) -> Opened:
        """`data` (payload JSON as stored) with each sealed value replaced by its plaintext, or
        by its field's replacement when the key is forgotten.

        Every event of a sealed type reads through here, so it is kept to one probe decode, one
        SealedValue decode and one splice per field, each straight from the probe's `Raw`
        views (no copies); null is told apart only when the value does not decode.

        Raises:
            ValueError: a sealed field holds something that is not a SealedValue, or one of
                another subject than the payload names.
            KeyNotLoadedError, SealedValueError: from the cipher.
        """
        found = self._probe.decode(data)
        redacted: tuple[str, ...] = ()
        for field in self.fields:
            raw = getattr(found, field.wire)
            if not raw:  # absent
                continue
            try:
                value = _decode_sealed(raw)
            except msgspec.DecodeError as error:
                if bytes(raw) == b"null":
                    continue
                raise ValueError(
                    f"`{field.path}` is declared {field.kind}: its value must be a sealed value "
                    f'{{"enc": "A256GCM", "sub", "kid", "iv", "ct"}}, not {bytes(raw)[:60]!r} '
                    f"({error})"
                ) from None
            subject = stream if field.subject is None else getattr(found, field.subject)
            if value.sub != subject:
                raise ValueError(
                    f"`{field.path}` is sealed for subject {value.sub!r:.80}, but the event "
                    f"names {subject!r:.80}"
                )
            plaintext = cipher.decrypt(value, event_id, field.path)
            if plaintext is None:
                plaintext = field.replacement
                redacted += (field.path,)
            data = _splice(data, raw, plaintext, field.path)
        return Opened(data=data, redacted=redacted)


_ENCODER = msgspec.json.Encoder()
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_MARK: Final = ALGORITHM.encode()


def open_unregistered(data: bytes, event_id: str, cipher: FieldCipher) -> Opened | None:
    """The payload of an unregistered type (no struct says what is sealed) with each top-level
    value that is a SealedValue opened, or null once forgotten; None when it holds none.

    A reader without the writer's structs (the CLI, another language's payload) still shows
    the plaintext it has keys for; what does not parse as a sealed value stays as it is.
    """
    if _MARK not in data:  # the common case: one substring search
        return None
    try:
        members = _TOP_LEVEL.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not an object: nothing to open
    redacted: list[str] = []
    opened = False
    for name, raw in members.items():
        body = bytes(raw)
        if _MARK not in body:
            continue
        try:
            value = SEALED_DECODER.decode(body)
        except msgspec.DecodeError:
            continue
        path = f"$.{name}"
        plaintext = cipher.decrypt(value, event_id, path)
        if plaintext is None:
            plaintext = b"null"
            redacted.append(path)
        data = _splice(data, body, plaintext, path)
        opened = True
    return Opened(data=data, redacted=tuple(redacted)) if opened else None


def _splice(data: bytes, raw: bytes | msgspec.Raw, plaintext: bytes, path: str) -> bytes:
    """`data` with `raw`, which must appear in it once, replaced by `plaintext`.

    The second search starts after the first match: a sealed value is an object of strings, so
    one occurrence cannot begin inside another.
    """
    start = data.find(raw)
    end = start + len(raw)
    if start < 0 or data.find(raw, end) >= 0:
        raise ValueError(f"the sealed value of `{path}` appears more than once")
    return data[:start] + plaintext + data[end:]


def _meta_spec(annotation: Any) -> dict[str, Any] | None:
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, msgspec.Meta) and meta.extra and SEALED_KEY in meta.extra:
            spec: dict[str, Any] = meta.extra[SEALED_KEY]
            return spec
    return None


def _bare(annotation: Any) -> Any:
    """`T` of `Annotated[T, ...]`, else the annotation itself."""
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _default_replacement(annotation: Any) -> Any:
    for candidate in (None, REDACTED):
        try:
            msgspec.convert(candidate, _bare(annotation))
        except msgspec.ValidationError:
            continue
        return candidate
    raise ValueError("its type takes neither None nor a string: give Personal(replacement=...)")


def seal_plan(type_name: str, version: int, cls: type[msgspec.Struct]) -> SealPlan | None:
    """The plan of a payload struct's sealed fields; None when it declares none.

    Raises:
        ValueError: a declaration is unusable (names no string subject field, or a replacement
            its type rejects); the message names the field.
    """
    fields = msgspec.structs.fields(cls)
    by_attr = {f.name: f for f in fields}
    declared = [(f, _meta_spec(f.type)) for f in fields]
    subjects = [f.name for f, spec in declared if spec is not None and spec["role"] == "subject"]
    if len(subjects) > 1:
        raise ValueError(
            f"fields {', '.join(subjects)} are all DataSubject(); declare one and name the others "
            f"with Personal(subject=...)"
        )
    sealed: list[SealedField] = []
    for info, spec in declared:
        if spec is None or spec["role"] != "sealed":
            continue
        subject_attr = spec["subject"] or (subjects[0] if subjects else None)
        subject_wire = None
        if subject_attr is not None:
            subject_info = by_attr.get(subject_attr)
            if subject_info is None or _bare(subject_info.type) is not str:
                raise ValueError(
                    f"field {info.name!r}: its subject {subject_attr!r} is not a str field"
                )
            subject_wire = subject_info.encode_name
        replacement = spec["replacement"]
        try:
            if replacement is _UNSET:
                replacement = _default_replacement(info.type)
            msgspec.convert(replacement, info.type)
        except (ValueError, msgspec.ValidationError) as error:
            raise ValueError(f"field {info.name!r}: replacement {replacement!r}: {error}") from None
        sealed.append(
            SealedField(
                attr=info.name,
                wire=info.encode_name,
                path=f"$.{info.encode_name}",
                kind=spec["kind"],
                subject=subject_wire,
                replacement=_ENCODER.encode(replacement),
            )
        )
    return SealPlan(type_name, version, tuple(sealed)) if sealed else None


def mark_sealed_properties(schema: dict[str, Any], plan: SealPlan, struct: str) -> None:
    """Show each sealed property of an exported payload schema in its wire form: a `$ref` to
    `SealedValue` whose `x-newfuse-sealed` tells the kind, the subject field (null: the event's
    stream) and the plaintext's own schema (what the value decrypts to)."""
    defs: dict[str, Any] = schema["$defs"]
    properties = defs[struct]["properties"]
    for field in plan.fields:
        plaintext = {k: v for k, v in properties[field.wire].items() if k != SCHEMA_MARK}
        properties[field.wire] = {
            "$ref": "#/$defs/SealedValue",
            "description": (
                f"{field.kind.capitalize()} field, sealed with its data subject's key "
                "(AES-256-GCM); it decrypts to JSON valid against `x-newfuse-sealed.plaintext`"
            ),
            SCHEMA_MARK: {"kind": field.kind, "subject": field.subject, "plaintext": plaintext},
        }
    _, components = msgspec.json.schema_components([SealedValue], ref_template="#/$defs/{name}")
    defs.update(components)


KEY_FORGOTTEN: Final = "key.forgotten"
"""Type of the event `fuse forget` appends (to `KEYS_STREAM`) when it deletes a subject's key."""

KEYS_STREAM: Final = "security.keys"
"""The stream of key events: who forgot which data subject, and when."""


class KeyForgotten(msgspec.Struct, frozen=True, kw_only=True):
    """A data subject's key was deleted (type `key.forgotten`): every field sealed with it now
    reads as its replacement. Never holds the key itself.

    Attributes:
        subject: the data subject forgotten.
        kid: the id of the key deleted (None when the store held no key for the subject).
        by: who asked (the OS user of `fuse forget`, or the caller's identity).
        reason: why, as given (a ticket number, "GDPR art. 17 request ..."), if given.
        timestamp: when the key was deleted.
    """

    subject: str
    kid: str | None = None
    by: str
    reason: str | None = None
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)
