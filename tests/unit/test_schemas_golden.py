"""Golden wire samples (tests/golden/*.json) decode, re-encode and compare byte for byte.

The samples were written once by our encoder and committed. A field that is dropped, renamed,
retyped or reordered in the envelope or a built-in payload changes the bytes, and this fails.
Change a sample only together with a deliberate change of the wire contract.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from newfuse.schemas import ENVELOPE_DECODER, ENVELOPE_ENCODER, Envelope, default_registry

GOLDEN = Path(__file__).parent.parent / "golden"
SAMPLES = sorted(GOLDEN.glob("*.json"))
REGISTRY = default_registry()


def _load(path: Path) -> tuple[bytes, Envelope]:
    body = path.read_bytes()
    return body, ENVELOPE_DECODER.decode(body)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda path: path.name)
def test_envelope_re_encodes_to_the_same_bytes(path: Path) -> None:
    body, envelope = _load(path)
    assert ENVELOPE_ENCODER.encode(envelope) == body


@pytest.mark.parametrize("path", SAMPLES, ids=lambda path: path.name)
def test_payload_decodes_through_the_registry_and_re_encodes_to_the_same_bytes(path: Path) -> None:
    body, envelope = _load(path)
    payload = REGISTRY.decode(envelope.type, envelope.schema_version, envelope.data)
    if REGISTRY.is_registered(envelope.type):
        assert type(payload) is REGISTRY.struct_for(envelope.type)
    else:
        assert isinstance(payload, dict)
    again = REGISTRY.encode(envelope.type, envelope.schema_version, payload)
    assert again == bytes(envelope.data)
    rebuilt = msgspec.structs.replace(envelope, data=msgspec.Raw(again))
    assert ENVELOPE_ENCODER.encode(rebuilt) == body


def test_every_built_in_type_has_a_golden_sample_with_full_lineage() -> None:
    by_type = {envelope.type: envelope for _, envelope in map(_load, SAMPLES)}
    for type_name, _, _ in REGISTRY.types():
        assert type_name in by_type, f"add tests/golden/{type_name}.v1.json"
        envelope = by_type[type_name]
        assert envelope.correlation_id and envelope.causation_id, type_name
        assert envelope.trace is not None and envelope.trace.tracestate, type_name


def test_an_unregistered_type_is_among_the_samples() -> None:
    types = {envelope.type for _, envelope in map(_load, SAMPLES)}
    assert any(not REGISTRY.is_registered(type_name) for type_name in types)


def test_the_wire_keys_are_the_contract() -> None:
    # The keys other languages read; a rename in a struct must not pass silently.
    _, envelope = _load(GOLDEN / "agent.state_update.v1.json")
    wire = msgspec.json.decode(ENVELOPE_ENCODER.encode(envelope))
    assert list(wire) == [
        "id",
        "stream",
        "type",
        "version",
        "timestamp",
        "correlation_id",
        "causation_id",
        "trace",
        "data",
    ]
    assert list(wire["data"]) == ["agentId", "state", "version", "timestamp"]
    _, message = _load(GOLDEN / "a2a.message.v1.json")
    data = msgspec.json.decode(message.data)
    assert list(data) == ["type", "payload", "metadata"]
    assert list(data["metadata"]) == ["timestamp", "sender", "protocol_version"]
