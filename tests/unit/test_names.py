"""Names on the wire: subject tokens, `<category>.<id>` stream names and event type names."""

from __future__ import annotations

import re

import pytest

from newfuse.errors import InvalidNameError, NameTooLongError
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    MAX_CATEGORY_BYTES,
    MAX_EVENT_ID_BYTES,
    MAX_PREFIX_BYTES,
    MAX_STREAM_ID_BYTES,
    MAX_STREAM_NAME_BYTES,
    MAX_TYPE_NAME_BYTES,
    StreamName,
    check_event_id,
    check_token,
    check_type_name,
)


@pytest.mark.parametrize("token", ["agent", "researcher-1", "a_b", "Ünïcode", "7f3c9a", "x"])
def test_valid_tokens_are_returned_unchanged(token: str) -> None:
    assert check_token(token, kind="agent id") == token


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "it is empty"),
        ("a.b", r"it contains a dot \('\.'\)"),
        ("a b", r"it contains a space \(' '\)"),
        ("a*", r"it contains '\*'"),
        ("a>", r"it contains '>'"),
        ("a\tb", r"control or space character '\\t' \(U\+0009\)"),
        ("a\nb", r"U\+000A"),
        ("a\x00b", r"U\+0000"),
        ("a\x7fb", r"U\+007F"),
        ("a\u00a0b", r"U\+00A0"),  # no-break space: whitespace that is not ' '
    ],
)
def test_invalid_tokens_are_rejected_naming_kind_value_and_reason(token: str, reason: str) -> None:
    with pytest.raises(
        InvalidNameError, match=rf"^invalid queue name {re.escape(repr(token))}: .*{reason}"
    ) as c:
        check_token(token, kind="queue name")
    assert (c.value.kind, c.value.name) == ("queue name", token)


def test_a_token_that_is_not_a_string_is_rejected_saying_so() -> None:
    with pytest.raises(InvalidNameError, match=r"invalid agent id '7': expected a string, got int"):
        check_token(7, kind="agent id")  # type: ignore[arg-type]


def test_stream_name_parses_into_category_and_id_and_prints_back() -> None:
    name = StreamName.parse("agent.researcher-1")
    assert name == StreamName("agent", "researcher-1")
    assert (name.category, name.id) == ("agent", "researcher-1")
    assert str(name) == "agent.researcher-1"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("agentr1", r"invalid stream name 'agentr1': expected '<category>\.<id>' with exactly one"),
        ("agent.", r"invalid stream id '': it is empty"),
        (".r1", r"invalid stream category '': it is empty"),
        ("agent.r.1", r"invalid stream id 'r\.1': it contains a dot"),
        ("ag ent.r1", r"invalid stream category 'ag ent': it contains a space"),
        ("agent.r>", r"invalid stream id 'r>': it contains '>'"),
    ],
)
def test_bad_stream_names_are_rejected_naming_the_token(name: str, message: str) -> None:
    with pytest.raises(InvalidNameError, match=message):
        StreamName.parse(name)


def test_a_stream_name_that_is_not_a_string_is_rejected_saying_so() -> None:
    with pytest.raises(
        InvalidNameError, match=r"^invalid stream name 'None': expected a string, got NoneType$"
    ):
        StreamName.parse(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["transaction", "a2a.message", "agent.state_update", "a.b.c-1"])
def test_type_names_may_hold_dots(name: str) -> None:
    assert check_type_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "it is empty"),
        ("a..b", "empty part"),
        ("a.", "empty part"),
        (".a", "empty part"),
        ("a b.c", "a space"),
        ("a.*", r"'\*'"),
        ("a.>", "'>'"),
        ("a/b", r"contains '/' \(the name becomes a schema file name\)"),
        ("a\\b", r"contains '\\\\'"),
        ("a.\x01", r"U\+0001"),
    ],
)
def test_bad_type_names_are_rejected_naming_the_whole_name(name: str, reason: str) -> None:
    with pytest.raises(
        InvalidNameError, match=rf"^invalid event type {re.escape(repr(name))}: .*{reason}"
    ):
        check_type_name(name)


@pytest.mark.parametrize(
    ("name", "kind", "limit_name", "size"),
    [
        ("c" * (MAX_CATEGORY_BYTES + 1) + ".x", "stream category", "MAX_CATEGORY_BYTES", 65),
        ("a." + "x" * (MAX_STREAM_ID_BYTES + 1), "stream id", "MAX_STREAM_ID_BYTES", 129),
        ("a." + "€" * 43, "stream id", "MAX_STREAM_ID_BYTES", 129),  # 43 characters, 129 bytes
        ("c" * 60 + "." + "x" * 100, "stream name", "MAX_STREAM_NAME_BYTES", 161),
    ],
)
def test_stream_names_longer_than_their_limits_in_utf8_bytes_are_refused(
    name: str, kind: str, limit_name: str, size: int
) -> None:
    with pytest.raises(
        NameTooLongError, match=rf"invalid {kind} .*{size} bytes long.*{limit_name}"
    ):
        StreamName.parse(name)


def test_stream_names_at_their_limits_parse() -> None:
    category, ident = "c" * MAX_CATEGORY_BYTES, "€" * 31  # 64 + 1 + 93 bytes
    assert StreamName.parse(f"{category}.{ident}") == StreamName(category, ident)
    whole = "c" * 31 + "." + "x" * MAX_STREAM_ID_BYTES
    assert len(whole) == MAX_STREAM_NAME_BYTES
    assert str(StreamName.parse(whole)) == whole


def test_a_name_too_long_error_keeps_the_name_and_cuts_it_in_the_message() -> None:
    name = "agent." + "x" * 5000
    with pytest.raises(NameTooLongError) as caught:
        StreamName.parse(name)
    error = caught.value
    assert isinstance(error, InvalidNameError) and not error.retryable
    assert (error.name, error.size, error.limit) == (name, 5006, MAX_STREAM_NAME_BYTES)
    assert "(5006 characters)" in str(error) and len(str(error)) < 300


def test_type_names_and_event_ids_have_length_limits() -> None:
    assert check_type_name("t" * MAX_TYPE_NAME_BYTES)
    with pytest.raises(NameTooLongError, match="MAX_TYPE_NAME_BYTES"):
        check_type_name("t" * (MAX_TYPE_NAME_BYTES + 1))
    assert check_event_id("0192f0c1-7a1b-7c3d-8e4f-0123456789ab")
    with pytest.raises(NameTooLongError, match="MAX_EVENT_ID_BYTES"):
        check_event_id("i" * (MAX_EVENT_ID_BYTES + 1))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "it is empty"),
        ("a b", r"' ' \(U\+0020\)"),
        ("a\r\nb", r"U\+000D"),
        ("\ud800", "surrogate"),
    ],
)
def test_event_ids_that_cannot_be_a_header_value_are_refused(value: str, reason: str) -> None:
    with pytest.raises(InvalidNameError, match=rf"invalid event id .*{reason}"):
        check_event_id(value)


def test_a_lone_surrogate_is_refused_in_a_token() -> None:
    with pytest.raises(InvalidNameError, match=r"lone surrogate \(U\+DC80\)"):
        StreamName.parse("agent.x\udc80")


def test_a_prefix_longer_than_its_limit_is_refused() -> None:
    assert Subjects("p" * MAX_PREFIX_BYTES).prefix == "p" * MAX_PREFIX_BYTES
    with pytest.raises(NameTooLongError, match=r"subject prefix .*MAX_PREFIX_BYTES"):
        Subjects("p" * (MAX_PREFIX_BYTES + 1))
