"""The read side's bounds on a stored body: nesting depth measured without recursion (and in
linear time on inputs built to make a scanner backtrack), and the place-in-the-log rule."""

from __future__ import annotations

import time

import msgspec
import pytest

from newfuse.errors import InvalidEnvelopeError
from newfuse.eventstore.base import VersionCheck
from newfuse.schemas import MAX_NESTING_DEPTH, Envelope, nesting_depth, parse_envelope, utcnow


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"1", 0),
        (b"[]", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'["[[[[", "]]]"]', 1),  # brackets inside strings do not count
        (b'["\\"[[[", 1]', 1),  # nor after an escaped quote
        (b'"[[[[', 0),  # an unterminated string runs to the end
        (b"[" * 10_000, 10_000),  # unbalanced: what a decoder would recurse into
        (b"]]][[", 0),
    ],
)
def test_nesting_depth_ignores_strings_and_counts_what_a_decoder_would_recurse_into(
    text: bytes, depth: int
) -> None:
    assert nesting_depth(text) == depth


@pytest.mark.parametrize(
    "text",
    [b'"\\"' * 200_000, b'"' * 400_000, b"\\" * 400_000, b'["' * 200_000, b"[" * 1_000_000],
)
def test_nesting_depth_stays_linear_on_inputs_built_to_backtrack(text: bytes) -> None:
    started = time.perf_counter()
    nesting_depth(text)
    assert time.perf_counter() - started < 1.0


def _body(data: bytes, stream: str = "agent.a1") -> bytes:
    head = msgspec.json.encode(
        {
            "id": "e1",
            "stream": stream,
            "type": "note",
            "version": 1,
            "timestamp": "2026-12-02T00:00:00Z",
        }
    )
    return head[:-1] + b',"data":' + data + b"}"


def test_parse_envelope_takes_data_at_the_limit_and_refuses_one_level_more() -> None:
    limit = b"[" * MAX_NESTING_DEPTH + b"]" * MAX_NESTING_DEPTH
    assert parse_envelope(_body(limit), "here", "agent.a1").stream == "agent.a1"
    with pytest.raises(InvalidEnvelopeError, match=r"at \$\.data: the body nests 66 deep"):
        parse_envelope(_body(b"[" + limit + b"]"), "here", "agent.a1")
    with pytest.raises(InvalidEnvelopeError, match=r"at \$\.stream: stream 'agent\.zz' is not"):
        parse_envelope(_body(b"1", stream="agent.zz"), "here", "agent.a1")


def _envelope(stream: str, version: int) -> Envelope:
    return Envelope(
        id="e",
        stream=stream,
        type="note",
        version=version,
        timestamp=utcnow(),
        data=msgspec.Raw(b"1"),
    )


def test_a_version_check_from_the_start_wants_1_then_each_next_and_skips_what_is_out_of_place() -> (
    None
):
    check = VersionCheck(from_start=True)
    with pytest.raises(InvalidEnvelopeError, match="version 2 does not follow the start"):
        check.admit(_envelope("a.b", 2), "here")
    check.admit(_envelope("a.b", 1), "here")
    with pytest.raises(
        InvalidEnvelopeError, match=r"version 7 does not follow version 1 of 'a\.b'"
    ):
        check.admit(_envelope("a.b", 7), "here")
    check.admit(_envelope("a.b", 2), "here")  # the invalid one did not move the stream


def test_a_version_check_mid_log_or_over_capacity_takes_an_unknown_streams_first_event() -> None:
    mid = VersionCheck(from_start=False)
    mid.admit(_envelope("a.b", 41), "here")
    with pytest.raises(InvalidEnvelopeError, match="expected 42"):
        mid.admit(_envelope("a.b", 41), "here")
    small = VersionCheck(from_start=True, capacity=2)
    small.admit(_envelope("a.x", 1), "here")
    small.admit(_envelope("a.y", 1), "here")
    small.admit(_envelope("a.z", 1), "here")  # forgets a.x
    small.admit(_envelope("a.x", 2), "here")  # a forgotten stream is taken as given
