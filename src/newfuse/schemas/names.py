"""Names on the wire: a stream is `<category>.<id>`; each token is one NATS subject token.

Lengths are limited (in UTF-8 bytes, as they travel) so that every subject and header stays far
from what NATS refuses: a protocol line longer than the server's `max_control_line` (4096 bytes
by default) makes the server close the connection, failing every caller that shares it. The
longest subject is `<prefix 32>.ev.<stream 160>` = 196 bytes, under the 256 NATS recommends; the
longest line we send (a direct get by subject, `PUB $JS.API.DIRECT.GET.<PREFIX>_EVENTS.<subject>
<inbox> <size>`) is about 330 bytes, a twelfth of the default.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from newfuse.errors import InvalidNameError, NameTooLongError

MAX_PREFIX_BYTES: Final = 32
"""Longest subject prefix (the first token of every subject; it also names the JetStream stream)."""
MAX_CATEGORY_BYTES: Final = 64
"""Longest stream category (`agent`, `saga`, ...)."""
MAX_STREAM_ID_BYTES: Final = 128
"""Longest stream id (the part after the dot): room for a UUID, a ULID or a hash with a label."""
MAX_STREAM_NAME_BYTES: Final = 160
"""Longest whole stream name `<category>.<id>` (both tokens at their limits would be 193)."""
MAX_TYPE_NAME_BYTES: Final = 128
"""Longest event type name: it travels in the `Fuse-Type` header and names the exported schema
file `<type>.v<n>.json`, which must stay under the 255-byte file name limit of file systems."""
MAX_EVENT_ID_BYTES: Final = 128
"""Longest event id: it travels in the `Nats-Msg-Id` header (UUIDv7 ids are 36)."""

# Fast paths: a name that matches is valid; one that does not goes through the slow checks
# below, which find the offending character and say which it is. Appends validate every name,
# so this keeps validation off the profile of the hot path.
_SUBJECT_TOKEN = r"[^\s.*>\x00-\x1f\x7f\ud800-\udfff]+"
# Type names and event ids travel as header values, so they are printable ASCII: nats.py before
# 2.16 dropped every header of a message holding a non-ASCII value, and its JetStream get_msg
# still hands such values back as email Header objects instead of strings.
_TYPE_TOKEN = r"[\x21-\x29\x2b-\x2d\x30-\x3d\x3f-\x5b\x5d-\x7e]+"
_VALID_TOKEN = re.compile(_SUBJECT_TOKEN)
_VALID_STREAM = re.compile(rf"({_SUBJECT_TOKEN})\.({_SUBJECT_TOKEN})")
_VALID_TYPE = re.compile(rf"{_TYPE_TOKEN}(?:\.{_TYPE_TOKEN})*")
_VALID_ID = re.compile(r"[\x21-\x7e]+")

# A stream name this short (in characters, all ASCII) is within every length limit.
_FAST_STREAM_BYTES: Final = min(MAX_CATEGORY_BYTES, MAX_STREAM_ID_BYTES)

_FORBIDDEN = {".": "a dot", " ": "a space", "*": "'*'", ">": "'>'"}


def _not_text(value: object) -> str:
    return f"expected a string, got {type(value).__name__}"


def _size(value: str) -> int:
    """Length in UTF-8 bytes (`isascii` is a flag check in CPython: the common case is free)."""
    return len(value) if value.isascii() else len(value.encode(errors="surrogatepass"))


def check_length(value: str, *, kind: str, limit: int, limit_name: str) -> str:
    """Return `value` if it is at most `limit` UTF-8 bytes long, else raise NameTooLongError."""
    size = _size(value)
    if size > limit:
        raise NameTooLongError(kind=kind, name=value, size=size, limit=limit, limit_name=limit_name)
    return value


def check_token(
    value: str, *, kind: str, max_bytes: int | None = None, limit_name: str = ""
) -> str:
    """Return `value` if it can be one subject token, else raise InvalidNameError naming why.

    With `max_bytes`, a longer token raises NameTooLongError naming `limit_name`.
    """
    if type(value) is str and _VALID_TOKEN.fullmatch(value):
        if max_bytes is not None:
            check_length(value, kind=kind, limit=max_bytes, limit_name=limit_name)
        return value
    if not isinstance(value, str):
        raise InvalidNameError(kind=kind, name=str(value), reason=_not_text(value))
    if not value:
        raise InvalidNameError(kind=kind, name=value, reason="it is empty")
    for char in value:
        if char in _FORBIDDEN:
            raise InvalidNameError(
                kind=kind, name=value, reason=f"it contains {_FORBIDDEN[char]} ({char!r})"
            )
        _check_char(char, kind=kind, value=value)
    return value


def _check_char(char: str, *, kind: str, value: str) -> None:
    if char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F:
        raise InvalidNameError(
            kind=kind,
            name=value,
            reason=f"it contains the control or space character {char!r} (U+{ord(char):04X})",
        )
    if 0xD800 <= ord(char) <= 0xDFFF:
        raise InvalidNameError(
            kind=kind,
            name=value,
            reason=f"it contains a lone surrogate (U+{ord(char):04X}), which UTF-8 cannot carry",
        )


_NOT_ASCII = "it contains the non-ASCII character {} (it travels in a header, which is ASCII)"


def _first_non_ascii(value: str) -> str:
    char = next(c for c in value if not c.isascii())
    return f"{char!r} (U+{ord(char):04X})"


def check_category(value: str, *, kind: str = "stream category") -> str:
    """Return a stream category if it is one token of at most MAX_CATEGORY_BYTES, else raise."""
    return check_token(
        value, kind=kind, max_bytes=MAX_CATEGORY_BYTES, limit_name="MAX_CATEGORY_BYTES"
    )


def check_event_id(value: str) -> str:
    """Return an event id if it can travel in the `Nats-Msg-Id` header, else raise.

    An id is printable ASCII without spaces (a header value ends at CR LF, and clients rewrite or
    trim what would break it, so the header would no longer match the body) and at most
    MAX_EVENT_ID_BYTES long.
    """
    if type(value) is str and _VALID_ID.fullmatch(value):
        return check_length(
            value, kind="event id", limit=MAX_EVENT_ID_BYTES, limit_name="MAX_EVENT_ID_BYTES"
        )
    if not isinstance(value, str):
        raise InvalidNameError(kind="event id", name=str(value), reason=_not_text(value))
    if not value:
        raise InvalidNameError(kind="event id", name=value, reason="it is empty")
    for char in value:
        _check_char(char, kind="event id", value=value)
    raise InvalidNameError(
        kind="event id", name=value, reason=_NOT_ASCII.format(_first_non_ascii(value))
    )


class StreamName(NamedTuple):
    """A parsed stream name: `category.id`, e.g. `agent.researcher-1`."""

    category: str
    id: str

    @classmethod
    def parse(cls, name: str) -> StreamName:
        """Split and validate `category.id`; the error names the offending token and character."""
        if (
            type(name) is str
            and (match := _VALID_STREAM.fullmatch(name))
            and len(name) <= _FAST_STREAM_BYTES
            and name.isascii()
        ):
            return cls(match.group(1), match.group(2))  # short enough for every length limit
        if not isinstance(name, str):
            raise InvalidNameError(kind="stream name", name=str(name), reason=_not_text(name))
        check_length(
            name,
            kind="stream name",
            limit=MAX_STREAM_NAME_BYTES,
            limit_name="MAX_STREAM_NAME_BYTES",
        )
        if "." not in name:
            raise InvalidNameError(
                kind="stream name",
                name=str(name),
                reason="expected '<category>.<id>' with exactly one dot, e.g. 'agent.researcher-1'",
            )
        category, _, ident = name.partition(".")
        check_category(category)
        check_token(
            ident, kind="stream id", max_bytes=MAX_STREAM_ID_BYTES, limit_name="MAX_STREAM_ID_BYTES"
        )
        return cls(category, ident)

    def __str__(self) -> str:
        return f"{self.category}.{self.id}"


def check_type_name(value: str) -> str:
    """Return an event type name if it is valid, else raise InvalidNameError naming why.

    A type name is one or more subject tokens joined by dots (`a2a.message`,
    `agent.state_update`): it travels in the `Fuse-Type` header and names the exported schema
    file, so the token rules apply to each part, '/' and '\\' are refused, and it is printable
    ASCII (header values are ASCII for every NATS client).

    Args:
        value: the type name to check.

    Returns:
        `value` unchanged.

    Raises:
        InvalidNameError: the name is empty, has an empty part (`a..b`, `.a`) or a part breaks the
            token rules; NameTooLongError (a subclass): it is longer than MAX_TYPE_NAME_BYTES.
    """
    if type(value) is str and _VALID_TYPE.fullmatch(value):
        return check_length(
            value, kind="event type", limit=MAX_TYPE_NAME_BYTES, limit_name="MAX_TYPE_NAME_BYTES"
        )
    if not isinstance(value, str):
        raise InvalidNameError(kind="event type", name=str(value), reason=_not_text(value))
    if not value:
        raise InvalidNameError(kind="event type", name=value, reason="it is empty")
    for separator in ("/", "\\"):
        if separator in value:
            raise InvalidNameError(
                kind="event type",
                name=value,
                reason=f"it contains {separator!r} (the name becomes a schema file name)",
            )
    for part in value.split("."):
        if not part:
            raise InvalidNameError(
                kind="event type",
                name=value,
                reason="it has an empty part (leading, trailing or doubled dot)",
            )
        try:
            check_token(part, kind="event type part")
        except InvalidNameError as error:
            raise InvalidNameError(kind="event type", name=value, reason=error.reason) from None
    raise InvalidNameError(
        kind="event type", name=value, reason=_NOT_ASCII.format(_first_non_ascii(value))
    )
