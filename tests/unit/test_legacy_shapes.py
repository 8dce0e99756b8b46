"""The New Fuse's V1 flat and V2 header/body messages: recognised, checked, mapped by field."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from newfuse.agents import legacy, wire
from newfuse.errors import InvalidEnvelopeError, ProtocolVersionError

SENT_MS = 1_767_323_045_123  # 2026-01-02T03:04:05.123Z
SENT = datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)


def v1(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": "msg-1",
        "type": "TASK_REQUEST",
        "timestamp": SENT_MS,
        "sender": "planner",
        "recipient": "coder",
        "payload": {"task": "write tests"},
        "metadata": {
            "priority": "high",
            "timeout": 5000,
            "retryCount": 2,
            "protocol_version": "1.0",
        },
    }
    return message | changes


def v2(header: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    return {
        "header": {
            "id": "hdr-1",
            "type": "CAPABILITY_DISCOVERY",
            "version": "2.0",
            "priority": "low",
            "source": "scout",
            "target": "registry",
        }
        | (header or {}),
        "body": {
            "content": {"want": ["search"]},
            "metadata": {
                "sent_at": SENT_MS,
                "timeout": 1500.0,
                "retries": 3,
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            }
            | metadata,
        },
    }


def read(message: Any) -> tuple[Any, Any]:
    return wire.decode(msgspec.json.encode(message), "on fuse.a2a.coder")


def test_a_v1_flat_message_maps_every_field() -> None:
    envelope, message = read(v1())
    assert (envelope.id, envelope.stream, envelope.type) == ("msg-1", "legacy.v1", "a2a.message")
    assert envelope.timestamp == SENT and envelope.trace is None
    assert envelope.metadata == {
        "legacy.shape": "v1",
        "legacy.recipient": "coder",
        "legacy.priority": "high",
        "legacy.timeout_ms": "5000",
        "legacy.retries": "2",
    }
    assert message.type == "task.request"
    assert message.payload == {"task": "write tests"}
    assert message.message_id == "msg-1"
    assert message.metadata.sender == "planner"
    assert message.metadata.timestamp == SENT
    assert message.metadata.protocol_version == "1.0"
    assert message.reply_to is None  # no reply address in either shape


def test_a_v2_header_body_message_maps_every_field() -> None:
    envelope, message = read(v2())
    assert (envelope.id, envelope.stream) == ("hdr-1", "legacy.v2")
    assert envelope.timestamp == SENT
    assert envelope.metadata == {
        "legacy.shape": "v2",
        "legacy.version": "2.0",
        "legacy.target": "registry",
        "legacy.priority": "low",
        "legacy.timeout_ms": "1500",
        "legacy.retries": "3",
        "legacy.trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    assert envelope.trace is not None
    version, trace_id, span_id, flags = envelope.trace.traceparent.split("-")
    assert (version, trace_id, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert len(span_id) == 16 and span_id != "0" * 16
    assert message.type == "capability.discovery"
    assert message.payload == {"want": ["search"]}
    assert message.metadata.sender == "scout"
    # header.version versions the V2 shape; the mapped message is protocol 1.0
    assert message.metadata.protocol_version == "1.0"


@pytest.mark.parametrize(("given", "mapped"), sorted(legacy.LEGACY_TYPES.items()))
def test_each_legacy_type_name_maps_to_a_message_type(given: str, mapped: str) -> None:
    assert read(v1(type=given))[1].type == mapped
    assert read(v2({"type": given}))[1].type == mapped


def test_a_type_that_is_already_a_type_name_is_kept_and_one_that_is_not_is_refused() -> None:
    assert read(v1(type="geo.lookup"))[1].type == "geo.lookup"
    with pytest.raises(InvalidEnvelopeError, match=r"at \$\.header\.type: legacy V2 message: "):
        read(v2({"type": "has space"}))


def test_content_that_is_not_an_object_is_wrapped_and_absent_content_is_empty() -> None:
    message = v2()
    message["body"]["content"] = "hello"
    assert read(message)[1].payload == {"value": "hello"}
    del message["body"]["content"]
    assert read(message)[1].payload == {}
    assert read(v1(payload=[1, 2]))[1].payload == {"value": [1, 2]}


def test_an_rfc3339_timestamp_is_accepted_and_a_naive_one_is_refused() -> None:
    assert read(v1(timestamp="2026-01-02T03:04:05.123Z"))[0].timestamp == SENT
    with pytest.raises(InvalidEnvelopeError, match=r"at \$\.timestamp: .*timezone"):
        read(v1(timestamp="2026-01-02T03:04:05"))


def test_ids_that_are_not_sane_tokens_are_replaced_by_stable_derived_uuids() -> None:
    odd = read(v1(id="has space/and>wildcard"))[0]
    assert uuid.UUID(odd.id).version == 5
    assert odd.metadata["legacy.id"] == "has space/and>wildcard"
    assert read(v1(id="has space/and>wildcard"))[0].id == odd.id  # every redelivery
    numeric = read(v2({"id": 42}))[0]
    assert uuid.UUID(numeric.id).version == 5 and numeric.metadata["legacy.id"] == "42"
    without = v1()
    del without["id"]
    first, again = read(without)[0], read(without)[0]
    assert first.id == again.id and uuid.UUID(first.id).version == 5
    assert read(v1(payload={"other": 1}) | {"id": None})[0].id != first.id  # of the body
    huge = read(v1(id=["x" * 10_000]))[0]
    assert len(huge.metadata["legacy.id"]) == 256  # kept, cut


def test_a_trace_id_that_is_not_w3c_becomes_a_stable_derived_trace() -> None:
    first = read(v2(trace_id="order-7"))[0].trace
    again = read(v2({"id": "hdr-2"}, trace_id="order-7"))[0].trace
    other = read(v2(trace_id="order-8"))[0].trace
    assert first is not None and again is not None and other is not None
    trace_of = [t.traceparent.split("-")[1] for t in (first, again, other)]
    assert trace_of[0] == trace_of[1] != trace_of[2]  # shared trace_id, shared trace
    assert first.traceparent.split("-")[2] != again.traceparent.split("-")[2]  # own spans
    assert read(v2(trace_id="0" * 32))[0].trace.traceparent.split("-")[1] != "0" * 32  # type: ignore[union-attr]
    message = v2()
    del message["body"]["metadata"]["trace_id"]
    assert read(message)[0].trace is None


def test_the_v1_protocol_version_is_checked_like_any_message_version() -> None:
    with pytest.raises(ProtocolVersionError, match=r"'3.0' of the message on fuse.a2a.coder"):
        read(v1(metadata={"protocol_version": "3.0"}))
    with pytest.raises(ProtocolVersionError, match=r"it is not a semantic version"):
        read(v1(metadata={"protocol_version": "one"}))
    with pytest.raises(ProtocolVersionError, match=r"it is null"):
        read(v1(metadata={"protocol_version": None}))
    no_version = read(v1(metadata={}))[1]
    assert no_version.metadata.protocol_version == "1.0"  # absent: the current version
    found = wire.refused(msgspec.json.encode(v1(metadata={"protocol_version": "3.0"})), "x")
    assert found is not None and found[0].id == "msg-1" and found[1].type == "task.request"


@pytest.mark.parametrize(
    ("message", "path", "says"),
    [
        (v1(sender=123), "$.sender", "Expected `str`, got `int`"),
        (v1(sender=""), "$.sender", "length >= 1"),
        (v1(sender="s" * 300), "$.sender", "length <= 256"),
        (v1(timestamp=True), "$.timestamp", "got `bool`"),
        (v1(timestamp=-1), "$.timestamp", ">= 0"),
        (v1(timestamp=10**20), "$.timestamp", "<= 253402300799999"),
        (v1(timestamp="yesterday"), "$.timestamp", "Invalid RFC3339"),
        (v1(metadata={"timeout": "5s"}), "$.metadata.timeout", "got `str`"),
        (v1(metadata={"retryCount": -1}), "$.metadata.retryCount", ">= 0"),
        (v1(metadata=[1]), "$.metadata", "Expected `object`, got `array`"),
        ({"sender": "s", "timestamp": 1}, "$.type", "missing required field `type`"),
        (v2({"version": 2}), "$.header.version", "got `int`"),
        (v2({"source": None}), "$.header.source", "got `null`"),
        (v2(retries=1.5), "$.body.metadata.retries", "got `float`"),
        (v2(trace_id=["t"]), "$.body.metadata.trace_id", "got `array`"),
        ({"header": {"type": "QUERY"}, "body": 5}, "$.header.version", "missing required"),
    ],
)
def test_a_legacy_message_with_a_bad_field_is_refused_naming_the_field(
    message: dict[str, Any], path: str, says: str
) -> None:
    with pytest.raises(InvalidEnvelopeError) as raised:
        read(message)
    assert raised.value.path == path
    assert "legacy V" in str(raised.value) and says in str(raised.value)


def test_deep_nesting_is_refused_before_any_decoder_sees_it() -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = [deep]
    with pytest.raises(InvalidEnvelopeError, match=r"the body nests \d+ deep"):
        read(v1(payload={"deep": deep}))


@pytest.mark.parametrize(
    "body",
    [
        {"hello": "world"},
        {"header": {"id": "h"}},  # no body: not V2
        {"sender": "s", "stream": "a2a.x", "data": {}},  # a broken envelope stays one
        [v1()],
        "just a string",
    ],
)
def test_a_body_of_neither_shape_is_an_invalid_envelope_as_before(body: Any) -> None:
    with pytest.raises(InvalidEnvelopeError, match=r"^invalid envelope on fuse.a2a.coder at \$"):
        read(body)
    assert legacy.recognise(msgspec.json.encode(body), "x") is None
