"""JSON Schema export in-process: files, index, determinism, `$ref`s, versions, reserved names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from jsonschema import Draft202012Validator

from newfuse.errors import SchemaRegistrationError
from newfuse.schemas import (
    JSON_SCHEMA_DIALECT,
    SchemaRegistry,
    build_export,
    default_registry,
    export_schemas,
)
from newfuse.schemas.export import render


class OrderV1(msgspec.Struct, frozen=True, kw_only=True):
    """An order, first shape."""

    id: str
    amount: float


class Line(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    qty: int


class OrderV2(msgspec.Struct, frozen=True, kw_only=True):
    """An order, with lines."""

    order_id: str
    lines: list[Line]


def orders() -> SchemaRegistry:
    registry = default_registry()
    registry.add("order.placed", 1, OrderV1)
    registry.add("order.placed", 2, OrderV2)
    registry.upcaster("order.placed", 1)(lambda v1: {"order_id": v1["id"], "lines": []})
    return registry


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_export_writes_envelope_each_type_and_version_and_the_index(tmp_path: Path) -> None:
    written = export_schemas(tmp_path, orders())
    assert [(entry.type, entry.version, entry.file, entry.latest) for entry in written] == [
        ("envelope", 1, "envelope.v1.json", True),
        ("a2a.message", 1, "a2a.message.v1.json", True),
        ("agent.card", 1, "agent.card.v1.json", True),
        ("agent.dead_letter", 1, "agent.dead_letter.v1.json", True),
        ("agent.deregistered", 1, "agent.deregistered.v1.json", True),
        ("agent.failed", 1, "agent.failed.v1.json", True),
        ("agent.heartbeat", 1, "agent.heartbeat.v1.json", True),
        ("agent.registered", 1, "agent.registered.v1.json", True),
        ("agent.started", 1, "agent.started.v1.json", True),
        ("agent.state_update", 1, "agent.state_update.v1.json", True),
        ("agent.stopped", 1, "agent.stopped.v1.json", True),
        ("aggregate.closed", 1, "aggregate.closed.v1.json", True),
        ("aggregate.late", 1, "aggregate.late.v1.json", True),
        ("audit.checkpoint", 1, "audit.checkpoint.v1.json", True),
        ("auth.failed", 1, "auth.failed.v1.json", True),
        ("circuit.closed", 1, "circuit.closed.v1.json", True),
        ("circuit.half_opened", 1, "circuit.half_opened.v1.json", True),
        ("circuit.opened", 1, "circuit.opened.v1.json", True),
        ("feedback.given", 1, "feedback.given.v1.json", True),
        ("identity.created", 1, "identity.created.v1.json", True),
        ("identity.revoked", 1, "identity.revoked.v1.json", True),
        ("key.forgotten", 1, "key.forgotten.v1.json", True),
        ("lock.granted", 1, "lock.granted.v1.json", True),
        ("lock.released", 1, "lock.released.v1.json", True),
        ("lock.requested", 1, "lock.requested.v1.json", True),
        ("model.invoked", 1, "model.invoked.v1.json", True),
        ("order.placed", 1, "order.placed.v1.json", False),
        ("order.placed", 2, "order.placed.v2.json", True),
        ("permission.denied", 1, "permission.denied.v1.json", True),
        ("review.approved", 1, "review.approved.v1.json", True),
        ("review.claimed", 1, "review.claimed.v1.json", True),
        ("review.escalated", 1, "review.escalated.v1.json", True),
        ("review.expired", 1, "review.expired.v1.json", True),
        ("review.input_edited", 1, "review.input_edited.v1.json", True),
        ("review.rejected", 1, "review.rejected.v1.json", True),
        ("review.requested", 1, "review.requested.v1.json", True),
        ("saga.aborted", 1, "saga.aborted.v1.json", True),
        ("saga.committed", 1, "saga.committed.v1.json", True),
        ("saga.lock_acquired", 1, "saga.lock_acquired.v1.json", True),
        ("saga.lock_waiting", 1, "saga.lock_waiting.v1.json", True),
        ("saga.resolved", 1, "saga.resolved.v1.json", True),
        ("saga.rolled_back", 1, "saga.rolled_back.v1.json", True),
        ("saga.started", 1, "saga.started.v1.json", True),
        ("saga.step_completed", 1, "saga.step_completed.v1.json", True),
        ("saga.step_failed", 1, "saga.step_failed.v1.json", True),
        ("saga.step_reviewed", 1, "saga.step_reviewed.v1.json", True),
        ("saga.step_started", 1, "saga.step_started.v1.json", True),
        ("saga.stuck", 1, "saga.stuck.v1.json", True),
        ("task.status", 1, "task.status.v1.json", True),
        ("transaction", 1, "transaction.v1.json", True),
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [entry.file for entry in written] + ["index.json"]
    )


def test_every_schema_is_a_valid_draft_2020_12_schema_whose_refs_resolve_in_the_file() -> None:
    for name, schema in build_export(orders()).items():
        if name == "index.json":
            continue
        assert schema["$schema"] == JSON_SCHEMA_DIALECT
        assert schema["$id"] == f"urn:newfuse:schema:{name}"
        Draft202012Validator.check_schema(schema)
        for ref in _refs(schema):
            assert ref.startswith("#/$defs/"), (name, ref)
            assert ref.removeprefix("#/$defs/") in schema["$defs"], (name, ref)


def test_each_version_validates_its_own_shape_only() -> None:
    files = build_export(orders())
    v1 = Draft202012Validator(files["order.placed.v1.json"])
    v2 = Draft202012Validator(files["order.placed.v2.json"])
    old = {"id": "o-1", "amount": 2.5}
    new = {"order_id": "o-1", "lines": [{"sku": "A-17", "qty": 2}]}
    v1.validate(old)
    v2.validate(new)
    assert not v1.is_valid(new)
    assert not v2.is_valid(old)
    with pytest.raises(jsonschema.ValidationError, match=r"'two' is not of type 'integer'"):
        v2.validate({"order_id": "o-1", "lines": [{"sku": "A-17", "qty": "two"}]})


def test_envelope_data_accepts_any_json_value() -> None:
    validator = Draft202012Validator(build_export()["envelope.v1.json"])
    base = {
        "id": "01a20eda-4add-7000-8408-168a50a453b1",
        "stream": "tool.grep-1",
        "type": "tool.called",
        "version": 1,
        "timestamp": "2026-11-24T12:00:00Z",
    }
    for data in ({"a": 1}, [1, "x"], "text", 3.5, None, True):
        validator.validate({**base, "data": data})
    assert not validator.is_valid(base)  # data is required
    assert not validator.is_valid({**base, "data": 1, "version": 0})  # versions start at 1
    assert not validator.is_valid({**base, "data": 1, "metadata": {"k": 1}})  # string values


def test_index_lists_files_upcasters_and_the_wire_contract() -> None:
    index = build_export(orders())["index.json"]
    assert index["dialect"] == JSON_SCHEMA_DIALECT
    assert index["envelope"]["file"] == "envelope.v1.json"
    listed = [(entry["type"], entry["version"], entry["file"]) for entry in index["types"]]
    assert [row for row in listed if row[0] in ("order.placed", "task.status", "transaction")] == [
        ("order.placed", 1, "order.placed.v1.json"),
        ("order.placed", 2, "order.placed.v2.json"),
        ("task.status", 1, "task.status.v1.json"),
        ("transaction", 1, "transaction.v1.json"),
    ]
    assert index["upcasters"] == [{"type": "order.placed", "from_version": 1, "to_version": 2}]
    wire = index["wire"]
    assert wire["subjects"]["events"] == "<prefix>.ev.<category>.<id>"
    assert set(wire["headers"]) >= {
        "Nats-Msg-Id",
        "Fuse-Type",
        "Fuse-Schema-Version",
        "Fuse-Stream-Version",
        "Nats-Expected-Last-Subject-Sequence",
    }


def test_export_is_deterministic_and_re_export_is_byte_identical(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    export_schemas(first, orders())
    export_schemas(second, orders())
    export_schemas(first, orders())  # over its own output
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name
    assert not [path.name for path in first.iterdir() if path.name.endswith(".tmp")]


def test_rendering_sorts_keys_and_ends_with_a_newline() -> None:
    assert render({"b": 1, "a": {"d": "é", "c": None}}) == (
        '{\n  "a": {\n    "c": null,\n    "d": "é"\n  },\n  "b": 1\n}\n'.encode()
    )


def test_docstring_descriptions_are_dedented() -> None:
    envelope = build_export()["envelope.v1.json"]["$defs"]["Envelope"]
    assert "\n    Attributes:" not in envelope["description"]
    assert "\nAttributes:\n    id: event id" in envelope["description"]


def test_base_uri_prefixes_every_id() -> None:
    files = build_export(base_uri="https://schemas.example.org/fuse/")
    assert files["transaction.v1.json"]["$id"] == (
        "https://schemas.example.org/fuse/transaction.v1.json"
    )
    assert files["index.json"]["envelope"]["id"] == (
        "https://schemas.example.org/fuse/envelope.v1.json"
    )


def test_a_type_that_would_overwrite_the_envelope_schema_is_refused() -> None:
    registry = SchemaRegistry()
    registry.add("envelope", 1, OrderV1)
    with pytest.raises(SchemaRegistrationError, match=r"'envelope' v1: its schema file"):
        build_export(registry)
