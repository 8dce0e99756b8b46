"""Names on the wire: subject tokens, `<category>.<id>` stream names and event type names."""

from __future__ import annotations

import re

import pytest

from newfuse.errors import InvalidNameError
from newfuse.schemas import StreamName, check_token, check_type_name


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
