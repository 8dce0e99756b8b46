"""Names on the wire: a stream is `<category>.<id>`; each token is one NATS subject token."""

from __future__ import annotations

from typing import NamedTuple

from newfuse.errors import InvalidNameError

_FORBIDDEN = {".": "a dot", " ": "a space", "*": "'*'", ">": "'>'"}


def check_token(value: str, *, kind: str) -> str:
    """Return `value` if it can be one subject token, else raise InvalidNameError naming why."""
    if not isinstance(value, str) or not value:
        raise InvalidNameError(kind=kind, name=str(value), reason="it is empty")
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
        if not isinstance(name, str) or "." not in name:
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
