"""Protocol versions of A2A messages (semantic versions) and the ranges an agent accepts.

A message's `metadata.protocol_version` is `MAJOR.MINOR` or `MAJOR.MINOR.PATCH` (digits, no
leading zeros; `1.0` equals `1.0.0`). Pre-release and build suffixes (`1.0.0-rc.1`, `+sha`)
are not protocol versions: the protocol has no pre-releases, and a suffix is refused by name.

A range is comma-separated comparisons that must all hold, e.g. `>=1.0,<2.0`; the operators
are `>=`, `>`, `<=`, `<`, `==` and `!=`, and a bare version means `==`. `*` admits every
version. Written checks only, no dependency: a range is a handful of tuple comparisons.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from newfuse.errors import ProtocolVersionError, VersionRangeError

MAX_VERSION_CHARS: Final = 32
"""Longest protocol version text accepted (a hostile sender's version is quoted in errors)."""
MAX_RANGE_CHARS: Final = 200

_VERSION = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})(?:\.(0|[1-9][0-9]{0,8}))?")
_SUFFIXED = re.compile(r"[0-9]+\.[0-9]+(?:\.[0-9]+)?[-+].*", re.DOTALL)
_CLAUSE = re.compile(r"\s*(>=|<=|==|!=|>|<)?\s*([^\s,]+)\s*")
_CACHED: Final = 1024  # versions parsed, and verdicts per range, kept (cleared when full)
_OPERATORS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


class ProtocolVersion(NamedTuple):
    """A protocol version; compares as (major, minor, patch)."""

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, value: object) -> ProtocolVersion:
        """The version a message states (any JSON value: it comes off the wire).

        Raises:
            ProtocolVersionError: `value` is not a string, too long, or not MAJOR.MINOR[.PATCH].
        """
        if type(value) is str:
            known = _PARSED.get(value)
            if known is not None:  # every message states one of a few versions: parse once
                return known
        if value is None:
            raise ProtocolVersionError(
                version="null",
                reason="it is null, not a string such as '1.0' (leave the field out to mean "
                "the current version)",
            )
        if not isinstance(value, str):
            raise ProtocolVersionError(
                version=_quoted(value),
                reason=f"it is a JSON {_json_kind(value)} ({type(value).__name__}), not a "
                f"string such as '1.0'",
            )
        if len(value) > MAX_VERSION_CHARS:
            raise ProtocolVersionError(
                version=value,
                reason=f"it is {len(value)} characters long; a version has at most "
                f"{MAX_VERSION_CHARS} (MAX_VERSION_CHARS)",
            )
        match = _VERSION.fullmatch(value)
        if match is None:
            reason = (
                "pre-release and build suffixes ('-rc.1', '+build') are not protocol versions"
                if _SUFFIXED.fullmatch(value)
                else "it is not a semantic version: write MAJOR.MINOR or MAJOR.MINOR.PATCH in "
                "digits without leading zeros, such as '1.0'"
            )
            raise ProtocolVersionError(version=value, reason=reason)
        major, minor, patch = match.groups()
        parsed = cls(int(major), int(minor), int(patch or 0))
        if len(_PARSED) >= _CACHED:
            _PARSED.clear()
        _PARSED[value] = parsed
        return parsed

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + (f".{self.patch}" if self.patch else "")


class VersionRange:
    """The protocol versions an agent accepts, e.g. `VersionRange.parse(">=1.0,<2.0")`.

    `str()` gives the range as written (normalised spacing), for errors and agent cards.
    """

    __slots__ = ("_admitted", "_clauses", "_verdicts", "spec")

    def __init__(self, spec: str, clauses: tuple[tuple[str, ProtocolVersion], ...]) -> None:
        self.spec = spec
        self._clauses = clauses
        self._verdicts: dict[ProtocolVersion, bool] = {}
        self._admitted: dict[str, ProtocolVersion] = {}

    @classmethod
    def parse(cls, spec: str) -> VersionRange:
        """A range from its text.

        Raises:
            VersionRangeError: the text is empty, too long, has a clause that is not
                `[op]MAJOR.MINOR[.PATCH]`, or its bounds admit no version.
        """
        if not isinstance(spec, str):
            raise VersionRangeError(spec=repr(spec), reason="a range is a string")
        if len(spec) > MAX_RANGE_CHARS:
            raise VersionRangeError(
                spec=spec[:40] + "...", reason=f"it is longer than {MAX_RANGE_CHARS} characters"
            )
        if spec.strip() == "*":
            return cls("*", ())
        clauses: list[tuple[str, ProtocolVersion]] = []
        for text in spec.split(","):
            match = _CLAUSE.fullmatch(text)
            if match is None:
                raise VersionRangeError(
                    spec=spec,
                    reason=f"clause {text.strip()!r} is not [op]VERSION "
                    f"(op one of >=, >, <=, <, ==, !=)",
                )
            op, version = match.group(1) or "==", match.group(2)
            try:
                clauses.append((op, ProtocolVersion.parse(version)))
            except ProtocolVersionError as error:
                raise VersionRangeError(
                    spec=spec, reason=f"clause {text.strip()!r}: {error.reason}"
                ) from None
        made = cls(",".join(f"{op}{version}" for op, version in clauses), tuple(clauses))
        if not made._bounded_nonempty():
            raise VersionRangeError(spec=spec, reason="no version satisfies every clause")
        return made

    def __contains__(self, version: object) -> bool:
        if not isinstance(version, ProtocolVersion):
            return False
        verdict = self._verdicts.get(version)
        if verdict is None:
            verdict = all(_OPERATORS[op](version, bound) for op, bound in self._clauses)
            if len(self._verdicts) >= _CACHED:
                self._verdicts.clear()
            self._verdicts[version] = verdict
        return verdict

    def check(self, stated: object) -> ProtocolVersion:
        """The version a message states (any JSON value), if this range admits it.

        Raises:
            ProtocolVersionError: `stated` is not a version, or the range does not admit it.
        """
        if type(stated) is str:
            known = self._admitted.get(stated)
            if known is not None:  # the hot path: one of the few versions senders state
                return known
        version = ProtocolVersion.parse(stated)
        if version not in self:
            raise ProtocolVersionError(
                version=str(stated),
                reason="it is outside the range this agent accepts",
                accepted=self.spec,
            )
        if isinstance(stated, str):
            if len(self._admitted) >= _CACHED:
                self._admitted.clear()
            self._admitted[stated] = version
        return version

    def lowest(self) -> ProtocolVersion:
        """The oldest version the range admits (0.0 when it has no lower bound)."""
        low = ProtocolVersion(0, 0)
        for op, bound in self._clauses:
            if op == ">":
                bound = ProtocolVersion(bound.major, bound.minor, bound.patch + 1)
            if op in (">=", ">", "==") and bound > low:
                low = bound
        return low

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"VersionRange({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VersionRange) and other._clauses == self._clauses

    def __hash__(self) -> int:
        return hash(self._clauses)

    def _bounded_nonempty(self) -> bool:
        # The lowest and highest version the bounds allow: empty when they cross. `!=` only
        # removes single points, so it is left out (a range of one excluded point is empty
        # too, which is caught by trying that point).
        low: tuple[int, int, int] = (0, 0, 0)
        high: tuple[int, int, int] | None = None
        low_open = high_open = False
        for op, bound in self._clauses:
            if op in (">=", ">", "==") and (bound > low or (bound == low and op == ">")):
                low, low_open = bound, op == ">"
            if op in ("<=", "<", "==") and (
                high is None or bound < high or (bound == high and op == "<")
            ):
                high, high_open = bound, op == "<"
        if high is None:
            return True
        if low > high or (low == high and (low_open or high_open)):
            return False
        if low == high:
            return ProtocolVersion(*low) in self
        return True


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "value"


def _quoted(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VERSION_CHARS else text[:MAX_VERSION_CHARS] + "..."


_PARSED: dict[str, ProtocolVersion] = {}

DEFAULT_PROTOCOLS: Final = ">=1.0,<2.0"
"""What an agent accepts unless told otherwise: every minor version of protocol 1."""
