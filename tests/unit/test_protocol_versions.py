"""Protocol versions and ranges: what parses, what an agent's range admits, what is refused."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from newfuse.agents import wire
from newfuse.errors import (
    InvalidEnvelopeError,
    ProtocolVersionError,
    SchemaRegistrationError,
    VersionRangeError,
)
from newfuse.schemas import (
    ENVELOPE_ENCODER,
    A2AMessage,
    A2AMetadata,
    Envelope,
    ProtocolVersion,
    VersionRange,
    default_registry,
    utcnow,
)


@pytest.mark.parametrize(
    ("text", "expected", "shown"),
    [
        ("1.0", (1, 0, 0), "1.0"),
        ("1.2.3", (1, 2, 3), "1.2.3"),
        ("0.9", (0, 9, 0), "0.9"),
        ("10.20.0", (10, 20, 0), "10.20"),
    ],
)
def test_a_version_is_major_minor_and_an_optional_patch(
    text: str, expected: tuple[int, int, int], shown: str
) -> None:
    version = ProtocolVersion.parse(text)
    assert tuple(version) == expected
    assert str(version) == shown


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1", "not a semantic version"),
        ("01.0", "not a semantic version"),
        ("1.x", "not a semantic version"),
        (" 1.0", "not a semantic version"),
        ("v1.0", "not a semantic version"),
        ("1.0.0-rc.1", "pre-release and build suffixes"),
        ("1.0+build.5", "pre-release and build suffixes"),
        ("1" * 40 + ".0", "at most 32 (MAX_VERSION_CHARS)"),
        ("1234567890.0", "not a semantic version"),  # a component has at most 9 digits
        (1.0, "JSON number (float), not a string"),
        (True, "JSON boolean (bool)"),
        ([1, 0], "JSON array (list)"),
        ({"major": 1}, "JSON object (dict)"),
    ],
)
def test_what_is_not_a_version_is_refused_with_the_reason(value: Any, reason: str) -> None:
    with pytest.raises(ProtocolVersionError, match=r"^protocol_version .*: ") as raised:
        ProtocolVersion.parse(value)
    assert reason in str(raised.value)
    assert not raised.value.retryable


@pytest.mark.parametrize(
    ("spec", "inside", "outside"),
    [
        (">=1.0,<2.0", ["1.0", "1.9.9", "1.10"], ["0.9", "2.0", "2.0.1"]),
        (" >= 1.1 , < 2 .0 ".replace(" .", "."), ["1.1", "1.5"], ["1.0", "2.0"]),
        ("1.2", ["1.2", "1.2.0"], ["1.2.1", "1.3"]),
        ("==1.2,!=1.3", ["1.2"], ["1.3"]),
        (">1.0,<=1.2", ["1.0.1", "1.2"], ["1.0", "1.2.1"]),
        ("!=1.1", ["1.0", "3.7"], ["1.1.0"]),
        ("*", ["0.0", "1.0", "99.1.1"], []),
    ],
)
def test_a_range_admits_exactly_the_versions_its_clauses_allow(
    spec: str, inside: list[str], outside: list[str]
) -> None:
    accepted = VersionRange.parse(spec)
    for text in inside:
        assert ProtocolVersion.parse(text) in accepted, (spec, text)
    for text in outside:
        assert ProtocolVersion.parse(text) not in accepted, (spec, text)
    assert "1.0" not in accepted  # only parsed versions are compared, never text


@pytest.mark.parametrize(
    ("spec", "lowest"),
    [(">=1.0,<2.0", "1.0"), (">1.1", "1.1.1"), ("<2.0", "0.0"), ("==1.2", "1.2"), ("*", "0.0")],
)
def test_a_range_knows_the_oldest_version_it_admits(spec: str, lowest: str) -> None:
    assert str(VersionRange.parse(spec).lowest()) == lowest


def test_a_range_prints_as_written_without_spaces() -> None:
    assert str(VersionRange.parse(" >= 1.0 , < 2.0 ")) == ">=1.0,<2.0"
    assert VersionRange.parse(">=1.0,<2.0") == VersionRange.parse(">=1.0.0, <2.0.0")


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "clause '' is not [op]VERSION"),
        (">=1.0,,<2.0", "clause '' is not [op]VERSION"),
        ("~1.0", "clause '~1.0': it is not a semantic version"),
        ("^1.0", "clause '^1.0': it is not a semantic version"),
        (">=1.0 <2.0", "is not [op]VERSION"),
        (">=2.0,<1.0", "no version satisfies every clause"),
        (">1.0,<=1.0", "no version satisfies every clause"),
        ("==1.0,!=1.0", "no version satisfies every clause"),
        (">=1.0-rc.1", "pre-release and build suffixes"),
        (">=1.0," * 40, "longer than 200 characters"),
    ],
)
def test_a_bad_range_is_refused_when_the_agent_is_declared(spec: str, reason: str) -> None:
    with pytest.raises(VersionRangeError, match=r"write comparisons joined by commas") as raised:
        VersionRange.parse(spec)
    assert reason in str(raised.value)


# -- reading messages by their protocol version -----------------------------------------------


def envelope_of(message: Any, event_id: str = "m-1") -> bytes:
    """An envelope around a message given as plain JSON values, unchecked (as a foreign client
    may send it)."""
    envelope = Envelope(
        id=event_id,
        stream="a2a.x",
        type=wire.MESSAGE_TYPE,
        version=1,
        timestamp=utcnow(),
        data=msgspec.Raw(msgspec.json.encode(message)),
    )
    return ENVELOPE_ENCODER.encode(envelope)


def message_json(**metadata: Any) -> dict[str, Any]:
    return {
        "type": "greet",
        "payload": {"name": "Ada", "priority": "high"},
        "metadata": {"timestamp": "2026-01-02T03:04:05Z", "sender": "s", **metadata},
        "replyTo": "tok",
    }


def test_a_message_without_a_version_is_read_as_the_current_one() -> None:
    assert wire.current_protocol() == ProtocolVersion(1, 0)
    body = msgspec.json.encode(
        {"type": "greet", "metadata": {"timestamp": "2026-01-02T03:04:05Z", "sender": "s"}}
    )
    _, message = wire.decode(envelope_of(msgspec.json.decode(body)), "here")
    assert message.metadata.protocol_version == "1.0"
    with pytest.raises(ProtocolVersionError, match=r"it is null, not a string .*leave the field"):
        wire.decode(envelope_of(message_json(protocol_version=None)), "here")


def test_a_newer_minor_version_is_read_with_the_current_shape_and_extra_fields_ignored() -> None:
    data = message_json(protocol_version="1.4.2") | {"futureField": [1, 2]}
    _, message = wire.decode(envelope_of(data), "here")
    assert type(message) is A2AMessage
    assert message.payload == {"name": "Ada", "priority": "high"}
    assert message.metadata.protocol_version == "1.4.2"


@pytest.mark.parametrize(
    ("stated", "accepts", "says"),
    [
        (
            "2.0",
            ">=1.0,<2.0",
            "'2.0' of the message here: it is outside the range this agent "
            "accepts; this agent accepts '>=1.0,<2.0'",
        ),
        ("1.0", ">=1.1,<2.0", "'1.0' of the message here: it is outside the range"),
        (
            "2.1",
            ">=1.0,<3.0",
            "this runtime reads protocol 1.x (current 1.0); no upcaster "
            "crosses a major version; this agent accepts '>=1.0,<3.0'",
        ),
        ("banana", ">=1.0,<2.0", "'banana' of the message here: it is not a semantic version"),
        (1.0, ">=1.0,<2.0", "'1.0' of the message here: it is a JSON number"),
    ],
)
def test_a_version_the_reader_does_not_accept_is_refused_naming_both(
    stated: Any, accepts: str, says: str
) -> None:
    body = envelope_of(message_json(protocol_version=stated))
    with pytest.raises(ProtocolVersionError) as raised:
        wire.decode(body, "here", accepts=VersionRange.parse(accepts))
    assert says in str(raised.value)
    assert raised.value.accepted == accepts


def test_what_a_refused_message_still_says_addresses_its_error_reply() -> None:
    body = envelope_of(message_json(protocol_version="7.0") | {"taskId": "t1"}, event_id="m-9")
    found = wire.refused(body, "here")
    assert found is not None
    envelope, stand_in = found
    assert envelope.id == "m-9"
    assert (stand_in.type, stand_in.reply_to, stand_in.task_id) == ("greet", "tok", "t1")
    assert stand_in.metadata.sender == "s" and stand_in.payload == {}
    hostile = message_json(protocol_version="7.0") | {"replyTo": "a.>", "type": "a b"}
    assert wire.refused(envelope_of(hostile), "here") is None  # no type name: no reply
    hostile["type"] = "greet"
    found = wire.refused(envelope_of(hostile), "here")
    assert found is not None and found[1].reply_to is None  # not a subject token
    assert wire.refused(b"not json", "here") is None


# -- upcasting older minor versions ---------------------------------------------------------


class GreetingV11(A2AMessage, frozen=True, kw_only=True, omit_defaults=True):
    """Protocol 1.1 for these tests: `priority` moves from the payload into the message."""

    priority: str


def registry_with_1_1(*, upcaster: bool = True) -> Any:
    registry = default_registry()
    registry.add(wire.MESSAGE_TYPE, 2, GreetingV11)
    calls: list[dict[str, Any]] = []
    if upcaster:

        @registry.upcaster(wire.MESSAGE_TYPE, 1)
        def to_1_1(v1: dict[str, Any]) -> dict[str, Any]:
            calls.append(v1)
            payload = dict(v1["payload"])
            priority = payload.pop("priority", "normal")
            metadata = v1["metadata"] | {"protocol_version": "1.1"}
            return v1 | {"payload": payload, "priority": priority, "metadata": metadata}

    registry.calls = calls  # type: ignore[attr-defined]
    return registry


def test_an_older_minor_version_is_upcast_through_the_registry_to_the_current_shape() -> None:
    registry = registry_with_1_1()
    assert wire.current_protocol(registry) == ProtocolVersion(1, 1)
    _, message = wire.decode(
        envelope_of(message_json(protocol_version="1.0")), "here", registry=registry
    )
    assert isinstance(message, GreetingV11)
    assert message.priority == "high" and message.payload == {"name": "Ada"}
    assert message.metadata.protocol_version == "1.1"
    assert message.reply_to == "tok"
    assert len(registry.calls) == 1
    # A 1.1 message (and one without a version: the current one) is read as it is.
    current = message_json(protocol_version="1.1") | {"priority": "low"}
    _, message = wire.decode(envelope_of(current), "here", registry=registry)
    assert isinstance(message, GreetingV11) and message.priority == "low"
    assert len(registry.calls) == 1


def test_an_older_minor_version_without_an_upcaster_is_an_invalid_message_naming_the_gap() -> None:
    registry = registry_with_1_1(upcaster=False)
    with pytest.raises(InvalidEnvelopeError, match=r"no upcaster from v1 to v2"):
        wire.decode(envelope_of(message_json(protocol_version="1.0")), "here", registry=registry)


def test_an_agent_cannot_read_messages_with_a_struct_that_is_not_an_a2a_message() -> None:
    class Other(msgspec.Struct, frozen=True):
        type: str
        metadata: A2AMetadata

    registry = default_registry()
    registry.add(wire.MESSAGE_TYPE, 2, Other)
    with pytest.raises(SchemaRegistrationError, match=r"must subclass A2AMessage"):
        wire.reading_registry(registry, "greeter")
