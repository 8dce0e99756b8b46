"""Property tests: every built-in payload and every envelope survives encode -> decode unchanged.

Hypothesis prints the failing example and how to reproduce it (its seed) when a property breaks.
"""

from __future__ import annotations

from datetime import UTC, timedelta, timezone
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from newfuse.schemas import (
    ENVELOPE_DECODER,
    ENVELOPE_ENCODER,
    A2AMessage,
    A2AMetadata,
    Envelope,
    StateUpdate,
    TraceContext,
    Transaction,
    default_registry,
)

REGISTRY = default_registry()

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=5)

aware_datetimes = st.datetimes(
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    )
)

a2a_messages = st.builds(
    A2AMessage,
    type=st.text(),
    payload=json_objects,
    metadata=st.builds(
        A2AMetadata, timestamp=aware_datetimes, sender=st.text(), protocol_version=st.text()
    ),
)
state_updates = st.builds(
    StateUpdate,
    agent_id=st.text(),
    state=json_objects,
    version=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    timestamp=aware_datetimes,
)
transactions = st.builds(
    Transaction,
    id=st.text(),
    operations=st.lists(json_objects, max_size=4),
    status=st.sampled_from(["active", "committed", "rolled_back"]),
    timestamp=aware_datetimes,
)

optional_text = st.none() | st.text()
envelopes = st.builds(
    Envelope,
    id=st.text(),
    stream=st.text(),
    type=st.text(),
    schema_version=st.integers(min_value=1, max_value=2**63 - 1),
    version=st.integers(min_value=1, max_value=2**63 - 1),
    timestamp=aware_datetimes,
    correlation_id=optional_text,
    causation_id=optional_text,
    trace=st.none() | st.builds(TraceContext, traceparent=st.text(), tracestate=optional_text),
    metadata=st.dictionaries(st.text(), st.text(), max_size=4),
    data=json_values.map(lambda value: msgspec.Raw(msgspec.json.encode(value))),
)


def _round_trip(type_name: str, payload: msgspec.Struct) -> None:
    encoded = REGISTRY.encode(type_name, 1, payload)
    decoded = REGISTRY.decode(type_name, 1, encoded)
    assert decoded == payload
    assert REGISTRY.encode(type_name, 1, decoded) == encoded
    # The plain-JSON path (what another language sends) gives the same struct.
    assert REGISTRY.encode(type_name, 1, msgspec.json.decode(encoded)) == encoded


@given(a2a_messages)
def test_a2a_message_round_trips(message: A2AMessage) -> None:
    _round_trip("a2a.message", message)


@given(state_updates)
def test_state_update_round_trips(update: StateUpdate) -> None:
    _round_trip("agent.state_update", update)


@given(transactions)
def test_transaction_round_trips(transaction: Transaction) -> None:
    _round_trip("transaction", transaction)


@given(envelopes)
def test_envelope_round_trips_byte_for_byte(envelope: Envelope) -> None:
    encoded = ENVELOPE_ENCODER.encode(envelope)
    decoded = ENVELOPE_DECODER.decode(encoded)
    assert decoded == envelope
    assert ENVELOPE_ENCODER.encode(decoded) == encoded


@given(envelopes, json_values)
def test_envelope_data_is_kept_as_the_exact_bytes_it_arrived_with(
    envelope: Envelope, value: Any
) -> None:
    # Another writer may format its JSON differently; the payload is carried, not re-encoded.
    spaced = msgspec.json.format(msgspec.json.encode(value), indent=2)
    body = ENVELOPE_ENCODER.encode(msgspec.structs.replace(envelope, data=msgspec.Raw(spaced)))
    assert bytes(ENVELOPE_DECODER.decode(body).data) == spaced
