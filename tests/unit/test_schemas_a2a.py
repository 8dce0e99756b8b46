"""A2A shapes: parts hold exactly one content, task states split terminal / interrupted."""

from __future__ import annotations

import msgspec
import pytest

from newfuse.schemas import (
    INTERRUPTED_STATES,
    TERMINAL_STATES,
    A2AMessage,
    TaskStatusUpdate,
    default_registry,
)


def test_a_part_with_two_contents_or_none_is_refused_naming_them() -> None:
    registry = default_registry()
    base = {"type": "q", "metadata": {"sender": "a/1"}}
    with pytest.raises(msgspec.ValidationError, match="exactly one of text, data or url"):
        msgspec.convert({**base, "parts": [{"text": "x", "url": "https://x"}]}, A2AMessage)
    with pytest.raises(msgspec.ValidationError, match="got none"):
        msgspec.convert({**base, "parts": [{"filename": "a.pdf"}]}, A2AMessage)
    ok = registry.decode("a2a.message", 1, msgspec.json.encode({**base, "parts": [{"data": 0}]}))
    assert ok.parts[0].data == 0


def test_a_seed_message_without_a2a_fields_still_decodes_and_re_encodes_unchanged() -> None:
    seed = b'{"type":"q","payload":{"a":1},"metadata":{"timestamp":"2026-01-01T00:00:00Z",'
    seed += b'"sender":"s","protocol_version":"1.0"}}'
    message = default_registry().decode("a2a.message", 1, seed)
    assert message.message_id is None and message.parts == []
    assert msgspec.json.encode(message) == seed


def test_terminal_and_interrupted_states_are_the_a2a_specs_and_cover_the_rest() -> None:
    assert TERMINAL_STATES == {"completed", "canceled", "failed", "rejected"}
    assert INTERRUPTED_STATES == {"input-required", "auth-required"}
    for state in ("submitted", "working", *TERMINAL_STATES, *INTERRUPTED_STATES):
        assert msgspec.convert({"taskId": "t", "state": state}, TaskStatusUpdate).state == state
    with pytest.raises(msgspec.ValidationError, match="state"):
        msgspec.convert({"taskId": "t", "state": "done"}, TaskStatusUpdate)


def test_derived_ids_are_the_uuid5_of_consumer_message_and_name() -> None:
    import uuid

    from newfuse.agents import wire

    for message_id, consumer, name in (("m-1", "geo", "0"), ("01a2-ü", "geo__k", "7model/3")):
        expected = uuid.uuid5(wire._NAMESPACE, f"{consumer}/{message_id}/{name}")
        assert wire.derived_id(message_id, consumer, name) == str(expected)
