"""The type registry: registration rules, upcaster chains, and the errors a user meets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from newfuse.errors import (
    InvalidNameError,
    InvalidPayloadError,
    MissingUpcasterError,
    SchemaRegistrationError,
    UnknownTypeError,
    UnknownVersionError,
)
from newfuse.schemas import (
    LIFECYCLE_TYPES,
    LOCK_TYPES,
    SAGA_TYPES,
    A2AMessage,
    A2AMetadata,
    AgentCard,
    AgentStopped,
    AggregateClosed,
    AggregateLate,
    AuditCheckpoint,
    AuthFailed,
    CircuitClosed,
    CircuitHalfOpened,
    CircuitOpened,
    DeadLetter,
    FeedbackGiven,
    IdentityCreated,
    IdentityRevoked,
    KeyForgotten,
    ModelInvoked,
    PermissionDenied,
    ReviewApproved,
    ReviewClaimed,
    ReviewEscalated,
    ReviewExpired,
    ReviewInputEdited,
    ReviewRejected,
    ReviewRequested,
    SchemaRegistry,
    StateUpdate,
    TaskStatusUpdate,
    Transaction,
    default_registry,
)

WHEN = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class OrderV1(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    amount: float


class OrderV2(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    amount: float


class OrderV3(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    amount_cents: int
    currency: str = "EUR"


def _v1_to_v2(v1: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": v1["id"], "amount": v1["amount"]}


def _v2_to_v3(v2: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": v2["order_id"], "amount_cents": round(v2["amount"] * 100)}


def orders(
    *, with_v1: bool = True, with_v2: bool = True, up12: bool = True, up23: bool = True
) -> SchemaRegistry:
    registry = SchemaRegistry()
    if with_v1:
        registry.add("order.placed", 1, OrderV1)
    if with_v2:
        registry.add("order.placed", 2, OrderV2)
    registry.add("order.placed", 3, OrderV3)
    if up12:
        registry.upcaster("order.placed", 1)(_v1_to_v2)
    if up23:
        registry.upcaster("order.placed", 2)(_v2_to_v3)
    return registry


# -- upcasting ---------------------------------------------------------------------------------


def test_v1_bytes_decode_into_the_v3_struct_through_the_chain() -> None:
    decoded = orders().decode("order.placed", 1, b'{"id":"o-1","amount":12.5}')
    assert decoded == OrderV3(order_id="o-1", amount_cents=1250, currency="EUR")


def test_v2_bytes_decode_into_the_v3_struct() -> None:
    decoded = orders().decode("order.placed", 2, b'{"order_id":"o-2","amount":0.99}')
    assert decoded == OrderV3(order_id="o-2", amount_cents=99)


def test_newest_version_decodes_without_upcasting() -> None:
    decoded = orders(up12=False, up23=False).decode(
        "order.placed", 3, b'{"order_id":"o-3","amount_cents":5,"currency":"USD"}'
    )
    assert decoded == OrderV3(order_id="o-3", amount_cents=5, currency="USD")


def test_old_version_without_a_struct_still_decodes_through_its_upcaster() -> None:
    # v1 was dropped from the code base; its upcaster remains, so old events still read.
    registry = orders(with_v1=False)
    decoded = registry.decode("order.placed", 1, msgspec.Raw(b'{"id":"o-4","amount":1}'))
    assert decoded == OrderV3(order_id="o-4", amount_cents=100)


def test_a_gap_in_the_chain_raises_missing_upcaster_naming_type_and_versions() -> None:
    registry = orders(up23=False)
    with pytest.raises(
        MissingUpcasterError,
        match=r"'order\.placed' v1 cannot be upcast to v3: no upcaster from v2 to v3 "
        r"\(known versions: 1, 2, 3\)",
    ) as caught:
        registry.decode("order.placed", 1, b'{"id":"o-1","amount":1}')
    error = caught.value
    assert isinstance(error, UnknownVersionError)
    assert (error.type_name, error.version, error.missing_from, error.newest) == (
        "order.placed",
        1,
        2,
        3,
    )
    assert error.known == [1, 2, 3]


def test_a_version_neither_registered_nor_upcastable_raises_unknown_version() -> None:
    registry = orders(with_v1=False, up12=False)
    with pytest.raises(
        UnknownVersionError,
        match=r"'order\.placed' has no schema version 1 \(known versions: 2, 3\)",
    ):
        registry.decode("order.placed", 1, b'{"id":"o-1","amount":1}')


def test_a_version_newer_than_the_newest_raises_unknown_version() -> None:
    with pytest.raises(UnknownVersionError, match=r"no schema version 4 \(known versions: 1, 2, 3"):
        orders().decode("order.placed", 4, b"{}")


def test_an_upcaster_that_raises_is_reported_as_an_invalid_payload_naming_the_step() -> None:
    # v1 data that lacks `id` is valid for a registry without the v1 struct, but the upcaster
    # cannot do its job.
    registry = orders(with_v1=False)
    with pytest.raises(
        InvalidPayloadError, match=r"'order\.placed' v1 at \$: upcaster v1->v2 .* raised KeyError"
    ):
        registry.decode("order.placed", 1, b'{"amount":1}')


def test_an_upcaster_result_the_newest_schema_rejects_names_the_field() -> None:
    registry = SchemaRegistry()
    registry.add("order.placed", 2, OrderV2)
    registry.upcaster("order.placed", 1)(lambda v1: {"order_id": v1["id"]})
    with pytest.raises(
        InvalidPayloadError,
        match=r"v2 at \$\.amount: Object missing required field `amount` "
        r"\(after upcasting from v1\)",
    ):
        registry.decode("order.placed", 1, b'{"id":"o-1"}')


def test_old_data_invalid_for_its_own_version_names_that_version_and_field() -> None:
    with pytest.raises(
        InvalidPayloadError, match=r"'order\.placed' v1 at \$\.amount: Expected `float`, got `str`"
    ):
        orders().decode("order.placed", 1, b'{"id":"o-1","amount":"ten"}')


# -- invalid payloads, unknown and unregistered types -----------------------------------------


def test_missing_nested_field_is_reported_with_its_full_path() -> None:
    registry = default_registry()
    with pytest.raises(
        InvalidPayloadError, match=r"'a2a\.message' v1 at \$\.metadata\.sender:"
    ) as c:
        registry.decode("a2a.message", 1, b'{"type":"ask","metadata":{}}')
    assert (c.value.type_name, c.value.version, c.value.path) == (
        "a2a.message",
        1,
        "$.metadata.sender",
    )


def test_wrongly_typed_nested_field_is_reported_with_its_path() -> None:
    with pytest.raises(
        InvalidPayloadError, match=r"at \$\.metadata\.sender: Expected `str`, got `int`"
    ):
        default_registry().decode("a2a.message", 1, b'{"type":"ask","metadata":{"sender":7}}')


def test_missing_top_level_field_uses_its_wire_name() -> None:
    with pytest.raises(InvalidPayloadError, match=r"'agent\.state_update' v1 at \$\.agentId:"):
        default_registry().decode("agent.state_update", 1, b'{"version":1}')


def test_transaction_status_outside_the_three_values_is_rejected() -> None:
    with pytest.raises(InvalidPayloadError, match=r"at \$\.status: Invalid enum value 'done'"):
        default_registry().decode("transaction", 1, b'{"id":"t1","status":"done"}')


def test_naive_timestamps_are_rejected() -> None:
    with pytest.raises(InvalidPayloadError, match=r"at \$\.timestamp: .*timezone"):
        default_registry().decode(
            "agent.state_update",
            1,
            b'{"agentId":"a","version":1,"timestamp":"2026-11-24T12:00:00"}',
        )


def test_unknown_fields_are_ignored_so_newer_senders_keep_working() -> None:
    decoded = default_registry().decode(
        "agent.state_update",
        1,
        b'{"agentId":"a","version":2,"timestamp":"2026-11-24T12:00:00Z","mood":"calm"}',
    )
    assert decoded == StateUpdate(agent_id="a", version=2, timestamp=WHEN)


def test_unregistered_type_decodes_as_raw_json() -> None:
    decoded = default_registry().decode("tool.called", 3, msgspec.Raw(b'{"tool":"grep","n":[1]}'))
    assert decoded == {"tool": "grep", "n": [1]}


def test_unregistered_type_with_malformed_json_raises_invalid_payload() -> None:
    with pytest.raises(InvalidPayloadError, match=r"'tool\.called' v1 at \$: .*truncated"):
        default_registry().decode("tool.called", 1, b'{"tool":')


def test_lookups_of_an_unknown_type_raise_unknown_type_naming_it() -> None:
    registry = default_registry()
    with pytest.raises(UnknownTypeError, match=r"event type 'tool\.called' is not registered"):
        registry.latest_version("tool.called")
    with pytest.raises(UnknownTypeError, match=r"'tool\.called' is not registered"):
        registry.struct_for("tool.called")
    with pytest.raises(UnknownTypeError, match=r"'OrderV1' is not registered \(struct class"):
        registry.type_of(OrderV1(id="o", amount=1))
    with pytest.raises(UnknownVersionError, match=r"'transaction' has no schema version 2"):
        registry.struct_for("transaction", 2)


# -- encoding --------------------------------------------------------------------------------------


def test_encode_accepts_the_struct_or_a_dict_and_gives_the_same_bytes() -> None:
    registry = default_registry()
    update = StateUpdate(agent_id="r1", state={"step": 2}, version=3, timestamp=WHEN)
    from_struct = registry.encode("agent.state_update", 1, update)
    from_dict = registry.encode(
        "agent.state_update",
        1,
        {"agentId": "r1", "state": {"step": 2}, "version": 3, "timestamp": "2026-11-24T12:00:00Z"},
    )
    assert from_struct == from_dict
    assert from_struct == (
        b'{"agentId":"r1","state":{"step":2},"version":3,"timestamp":"2026-11-24T12:00:00Z"}'
    )


def test_encode_rejects_a_dict_that_does_not_match_naming_the_field() -> None:
    with pytest.raises(InvalidPayloadError, match=r"'a2a\.message' v1 at \$\.metadata\.sender:"):
        default_registry().encode("a2a.message", 1, {"type": "ask", "metadata": {}})


def test_encode_rejects_a_struct_whose_fields_have_the_wrong_types() -> None:
    # msgspec does not validate on construction; the registry checks before anything is written.
    bad = StateUpdate(agent_id=42, version=1, timestamp=WHEN)  # type: ignore[arg-type]
    with pytest.raises(InvalidPayloadError, match=r"at \$\.agentId: Expected `str`, got `int`"):
        default_registry().encode("agent.state_update", 1, bad)


def test_encode_rejects_a_naive_timestamp() -> None:
    naive = Transaction(id="t1", timestamp=datetime(2026, 11, 24, 12, 0))
    with pytest.raises(InvalidPayloadError, match=r"'transaction' v1 at \$\.timestamp:"):
        default_registry().encode("transaction", 1, naive)


def test_encode_rejects_another_struct_class() -> None:
    message = A2AMessage(type="ask", metadata=A2AMetadata(sender="a", timestamp=WHEN))
    with pytest.raises(InvalidPayloadError, match=r"got a A2AMessage, expected Transaction"):
        default_registry().encode("transaction", 1, message)


def test_encode_of_an_unregistered_version_raises_unknown_version() -> None:
    with pytest.raises(UnknownVersionError, match=r"'transaction' has no schema version 9"):
        default_registry().encode("transaction", 9, {"id": "t"})


def test_encode_of_an_unregistered_type_passes_any_json_value_through() -> None:
    assert default_registry().encode("tool.called", 1, {"tool": "grep"}) == b'{"tool":"grep"}'


def test_encode_of_an_unregistered_type_that_is_not_json_raises_invalid_payload() -> None:
    with pytest.raises(InvalidPayloadError, match=r"'tool\.called' v1 at \$: .*Encoding objects"):
        default_registry().encode("tool.called", 1, {"handle": object()})


# -- registration ------------------------------------------------------------------------------


def test_register_decorator_declares_type_and_version() -> None:
    registry = SchemaRegistry()

    @registry.register("note.added", 2)
    class NoteAdded(msgspec.Struct, frozen=True):
        text: str

    assert registry.type_of(NoteAdded(text="x")) == ("note.added", 2)
    assert registry.struct_for("note.added") is NoteAdded
    assert registry.latest_version("note.added") == 2
    assert registry.is_registered("note.added")
    assert not registry.is_registered("note.removed")


def test_registering_the_same_class_twice_at_the_same_place_is_a_no_op() -> None:
    registry = SchemaRegistry()
    registry.add("order.placed", 1, OrderV1)
    registry.add("order.placed", 1, OrderV1)
    assert list(registry.types()) == [("order.placed", 1, OrderV1)]


def test_a_taken_place_cannot_be_registered_again() -> None:
    registry = SchemaRegistry()
    registry.add("order.placed", 1, OrderV1)
    with pytest.raises(
        SchemaRegistrationError,
        match=r"cannot register 'order\.placed' v1: it is already registered as OrderV1",
    ):
        registry.add("order.placed", 1, OrderV2)


def test_one_class_cannot_describe_two_types() -> None:
    registry = SchemaRegistry()
    registry.add("order.placed", 1, OrderV1)
    with pytest.raises(SchemaRegistrationError, match=r"OrderV1 is already registered as 'order"):
        registry.add("order.created", 1, OrderV1)


@pytest.mark.parametrize("version", [0, -1])
def test_versions_start_at_one(version: int) -> None:
    with pytest.raises(SchemaRegistrationError, match=rf"v{version}: schema versions start at 1"):
        SchemaRegistry().add("order.placed", version, OrderV1)


def test_only_msgspec_structs_can_be_registered() -> None:
    with pytest.raises(SchemaRegistrationError, match=r"is not a msgspec\.Struct class"):
        SchemaRegistry().add("order.placed", 1, dict)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "it is empty"),
        ("order..placed", "empty part"),
        (".order", "empty part"),
        ("order placed", "a space"),
        ("order.*", r"'\*'"),
        ("orders/placed", r"contains '/'"),
    ],
)
def test_type_names_follow_the_token_rules(name: str, reason: str) -> None:
    with pytest.raises(InvalidNameError, match=rf"invalid event type {name!r}: .*{reason}"):
        SchemaRegistry().add(name, 1, OrderV1)


def test_a_second_upcaster_for_the_same_step_is_refused() -> None:
    registry = orders()
    with pytest.raises(SchemaRegistrationError, match=r"v1: an upcaster to v2 exists already"):
        registry.upcaster("order.placed", 1)(_v2_to_v3)


def test_upcasters_start_from_version_one() -> None:
    with pytest.raises(SchemaRegistrationError, match=r"an upcaster starts from a schema version"):
        SchemaRegistry().upcaster("order.placed", 0)


def test_types_and_upcasters_are_listed_sorted() -> None:
    registry = orders()
    assert [(name, version) for name, version, _ in registry.types()] == [
        ("order.placed", 1),
        ("order.placed", 2),
        ("order.placed", 3),
    ]
    assert list(registry.upcasters()) == [("order.placed", 1), ("order.placed", 2)]


def test_strict_categories_are_validated_and_remembered() -> None:
    registry = SchemaRegistry()
    registry.declare_strict("saga")
    assert registry.is_strict("saga")
    assert not registry.is_strict("agent")
    with pytest.raises(InvalidNameError, match=r"invalid stream category 'sa\.ga'"):
        registry.declare_strict("sa.ga")


def test_default_registry_holds_the_built_in_types_and_is_a_fresh_copy() -> None:
    first = default_registry()
    assert [(n, v, c) for n, v, c in first.types()] == [
        ("a2a.message", 1, A2AMessage),
        ("agent.card", 1, AgentCard),
        ("agent.dead_letter", 1, DeadLetter),
        *((name, 1, cls) for name, cls in sorted(LIFECYCLE_TYPES.items())[:5]),
        ("agent.state_update", 1, StateUpdate),
        ("agent.stopped", 1, AgentStopped),
        ("aggregate.closed", 1, AggregateClosed),
        ("aggregate.late", 1, AggregateLate),
        ("audit.checkpoint", 1, AuditCheckpoint),
        ("auth.failed", 1, AuthFailed),
        ("circuit.closed", 1, CircuitClosed),
        ("circuit.half_opened", 1, CircuitHalfOpened),
        ("circuit.opened", 1, CircuitOpened),
        ("feedback.given", 1, FeedbackGiven),
        ("identity.created", 1, IdentityCreated),
        ("identity.revoked", 1, IdentityRevoked),
        ("key.forgotten", 1, KeyForgotten),
        *((name, 1, cls) for name, cls in sorted(LOCK_TYPES.items())),
        ("model.invoked", 1, ModelInvoked),
        ("permission.denied", 1, PermissionDenied),
        ("review.approved", 1, ReviewApproved),
        ("review.claimed", 1, ReviewClaimed),
        ("review.escalated", 1, ReviewEscalated),
        ("review.expired", 1, ReviewExpired),
        ("review.input_edited", 1, ReviewInputEdited),
        ("review.rejected", 1, ReviewRejected),
        ("review.requested", 1, ReviewRequested),
        *((name, 1, cls) for name, cls in sorted(SAGA_TYPES.items())),
        ("task.status", 1, TaskStatusUpdate),
        ("transaction", 1, Transaction),
    ]
    first.add("order.placed", 1, OrderV1)
    assert not default_registry().is_registered("order.placed")
