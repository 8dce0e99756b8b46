"""Names on the wire: a stream is `<category>.<id>`; each token is one NATS subject token."""

from __future__ import annotations

import re
from typing import NamedTuple

from newfuse.errors import InvalidNameError

# Fast paths: a name that matches is valid; one that does not goes through the slow checks
# below, which find the offending character and say which it is. Appends validate every name,
# so this keeps validation off the profile of the hot path.
_SUBJECT_TOKEN = r"[^\s.*>\x00-\x1f\x7f]+"
_TYPE_TOKEN = r"[^\s.*>/\\\x00-\x1f\x7f]+"
_VALID_TOKEN = re.compile(_SUBJECT_TOKEN)
_VALID_STREAM = re.compile(rf"({_SUBJECT_TOKEN})\.({_SUBJECT_TOKEN})")
_VALID_TYPE = re.compile(rf"{_TYPE_TOKEN}(?:\.{_TYPE_TOKEN})*")

_FORBIDDEN = {".": "a dot", " ": "a space", "*": "'*'", ">": "'>'"}


def _not_text(value: object) -> str:
    return f"expected a string, got {type(value).__name__}"


def check_token(value: str, *, kind: str) -> str:
    """Return `value` if it can be one subject token, else raise InvalidNameError naming why."""
    if type(value) is str and _VALID_TOKEN.fullmatch(value):
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
        if char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F:
            raise InvalidNameError(
                kind=kind,
                name=value,
                reason=f"it contains the control or space character {char!r} (U+{ord(char):04X})",
            )
    return value


class StreamName(NamedTuple):
    """A parsed stream name: `category.id`, e.g. `agent.researcher-1`."""

    category: str
    id: str

    @classmethod
    def parse(cls, name: str) -> StreamName:
        """Split and validate `category.id`; the error names the offending token and character."""
        if type(name) is str and (match := _VALID_STREAM.fullmatch(name)):
            return cls(match.group(1), match.group(2))
        if not isinstance(name, str):
            raise InvalidNameError(kind="stream name", name=str(name), reason=_not_text(name))
        if "." not in name:
            raise InvalidNameError(
                kind="stream name",
                name=str(name),
                reason="expected '<category>.<id>' with exactly one dot, e.g. 'agent.researcher-1'",
            )
        category, _, ident = name.partition(".")
        check_token(category, kind="stream category")
        check_token(ident, kind="stream id")
        return cls(category, ident)

    def __str__(self) -> str:
        return f"{self.category}.{self.id}"


def check_type_name(value: str) -> str:
    """Return an event type name if it is valid, else raise InvalidNameError naming why.

    A type name is one or more subject tokens joined by dots (`a2a.message`,
    `agent.state_update`): it travels in the `Fuse-Type` header and names the exported schema
    file, so the token rules apply to each part, and '/' and '\\' are refused.

    Args:
        value: the type name to check.

    Returns:
        `value` unchanged.

    Raises:
        InvalidNameError: the name is empty, has an empty part (`a..b`, `.a`) or a part breaks the
            token rules.
    """
    if type(value) is str and _VALID_TYPE.fullmatch(value):
        return value
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
    return value
