"""A stored message body: its bounds (nesting depth) and how it becomes an Envelope, checked."""

from __future__ import annotations

import re
from collections.abc import Set as AbstractSet
from itertools import accumulate
from typing import Final

import msgspec

from newfuse.errors import InvalidEnvelopeError, InvalidNameError, NestingTooDeepError
from newfuse.schemas.envelope import ENVELOPE_DECODER, Envelope
from newfuse.schemas.names import StreamName, check_type_name

MAX_NESTING_DEPTH: Final = 64
"""Deepest nesting of arrays and objects an event's payload (`data`) may have (`{}` and `[]` are
depth 1). The envelope around it adds one level, so a body may nest `MAX_NESTING_DEPTH + 1` deep.
Deeper bodies are refused before any decoder sees them: msgspec decodes recursively and would
otherwise raise RecursionError at a depth that depends on the caller's stack."""

_BODY_DEPTH: Final = MAX_NESTING_DEPTH + 1
# JSON strings, possessive so that no input backtracks; an unterminated one runs to the end,
# so every quote starts at most one match and the scan stays linear.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes


def nesting_depth(body: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, strings ignored (linear, no recursion).

    For text that is not JSON the figure is still a bound on what a decoder would recurse into.
    """
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(0, max(accumulate(memoryview(brackets.translate(_STEP)).cast("b"))))


def check_depth(body: bytes, where: str) -> None:
    """Refuse a body nested deeper than the wire contract allows, before decoding it.

    Raises:
        InvalidEnvelopeError: the body nests deeper than `MAX_NESTING_DEPTH` + 1.
    """
    # Fast path: a body with few brackets cannot nest deep (most events have a handful).
    if body.count(b"[") + body.count(b"{") > _BODY_DEPTH:
        _check_depth(body, where)


def _check_depth(body: bytes, where: str) -> None:
    depth = nesting_depth(body)
    if depth > _BODY_DEPTH:
        raise InvalidEnvelopeError(
            where=where,
            path="$.data",
            reason=f"the body nests {depth} deep; an event's data may nest at most "
            f"{MAX_NESTING_DEPTH} deep (MAX_NESTING_DEPTH), its envelope one more",
        )


def check_data_depth(data: bytes, *, type_name: str, version: int) -> bytes:
    """Return an append's encoded `data` if it nests at most MAX_NESTING_DEPTH, else raise.

    Raises:
        NestingTooDeepError: it nests deeper; the error names the depth and the limit.
    """
    if data.count(b"[") + data.count(b"{") <= MAX_NESTING_DEPTH:  # cannot nest deeper
        return data
    depth = nesting_depth(data)
    if depth > MAX_NESTING_DEPTH:
        raise NestingTooDeepError(
            type_name=type_name, version=version, depth=depth, limit=MAX_NESTING_DEPTH
        )
    return data


# Names already found valid, so that a replay checks each stream and type name once, not once
# per event (bounded: cleared when full).
_KNOWN_STREAMS: set[str] = set()
_KNOWN_TYPES: set[str] = set()
_KNOWN_MAX: Final = 65_536


def checked_names() -> tuple[AbstractSet[str], AbstractSet[str]]:
    """The stream names and type names `parse_envelope` has found valid so far (live views: they
    grow, and are cleared when full). A reader's fast path may take an envelope whose stream and
    type are in them as checked, and must send any other through `parse_envelope`."""
    return _KNOWN_STREAMS, _KNOWN_TYPES


def parse_envelope(
    body: bytes, where: str, stream: str | None = None, *, bounded: bool = True
) -> Envelope:
    """The envelope of a stored body, checked against the wire contract and its place.

    Args:
        body: the message body as stored.
        where: where it is stored (e.g. "on fuse.ev.agent.r1"), for the error.
        stream: the stream its subject (or row) says it belongs to; the envelope must agree.
        bounded: check `MAX_NESTING_DEPTH` first (about 0.3 us per event). Without it only
            what the decoder cannot take (RecursionError) is refused: for a store whose every
            writer bounded the depth already.

    Raises:
        InvalidEnvelopeError: too deep, not JSON, not an envelope, a bad stream or type name,
            or in another stream's place.
    """
    if bounded and body.count(b"[") + body.count(b"{") > _BODY_DEPTH:  # check_depth, inline
        _check_depth(body, where)
    try:
        envelope = ENVELOPE_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        text = str(error)
        path = text.rsplit("at `", 1)[1].rstrip("`") if "at `" in text else "$"
        raise InvalidEnvelopeError(where=where, path=path, reason=text) from None
    except RecursionError:  # only when not `bounded`: the decoder's own guard
        raise InvalidEnvelopeError(
            where=where, path="$", reason="nested too deep for the decoder"
        ) from None
    name = envelope.stream
    if stream is not None and name != stream:
        raise InvalidEnvelopeError(
            where=where,
            path="$.stream",
            reason=f"stream {name!r} is not the stream it is stored under ({stream!r})",
        )
    if name not in _KNOWN_STREAMS:
        try:
            StreamName.parse(name)  # a subject with too many tokens is no stream
        except InvalidNameError as error:
            raise InvalidEnvelopeError(where=where, path="$.stream", reason=str(error)) from None
        _remember(_KNOWN_STREAMS, name)
    if envelope.type not in _KNOWN_TYPES:
        try:
            check_type_name(envelope.type)
        except InvalidNameError as error:
            raise InvalidEnvelopeError(where=where, path="$.type", reason=str(error)) from None
        _remember(_KNOWN_TYPES, envelope.type)
    return envelope


def _remember(known: set[str], name: str) -> None:
    if len(known) >= _KNOWN_MAX:
        known.clear()
    known.add(name)


def out_of_place(envelope: Envelope, previous: int) -> str | None:
    """Why `envelope` is not the next event of its stream after version `previous`, or None.

    The rule of the wire contract: a stream's versions are 1, 2, 3, ... in log order; an event
    whose version is not the previous valid event's plus one is invalid and does not count.
    """
    if envelope.version == previous + 1:
        return None
    before = (
        f"version {previous} of {envelope.stream!r} (its previous valid event)"
        if previous
        else f"the start of {envelope.stream!r} (no valid event before it)"
    )
    return f"version {envelope.version} does not follow {before}; expected {previous + 1}"
