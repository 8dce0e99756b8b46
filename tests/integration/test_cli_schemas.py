"""`fuse schemas export` / `list` as a user runs them: a subprocess, then jsonschema on the files.

What another language relies on: every file is a valid Draft 2020-12 schema, an encoded example
of each type validates, and a broken one (wrong type, missing required field) is rejected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator

from newfuse.schemas import (
    ENVELOPE_ENCODER,
    A2AMessage,
    A2AMetadata,
    Envelope,
    StateUpdate,
    TraceContext,
    Transaction,
    default_registry,
    new_event_id,
)

GOLDEN = Path(__file__).parent.parent / "golden"
WHEN = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
BUILT_IN = [
    "a2a.message",
    "agent.card",
    "agent.dead_letter",
    "agent.deregistered",
    "agent.failed",
    "agent.heartbeat",
    "agent.registered",
    "agent.started",
    "agent.state_update",
    "agent.stopped",
    "aggregate.closed",
    "aggregate.late",
    "audit.checkpoint",
    "auth.failed",
    "circuit.closed",
    "circuit.half_opened",
    "circuit.opened",
    "feedback.given",
    "identity.created",
    "identity.revoked",
    "key.forgotten",
    "lock.granted",
    "lock.released",
    "lock.requested",
    "model.invoked",
    "permission.denied",
    "review.approved",
    "review.claimed",
    "review.escalated",
    "review.expired",
    "review.input_edited",
    "review.rejected",
    "review.requested",
    "saga.aborted",
    "saga.committed",
    "saga.lock_acquired",
    "saga.lock_waiting",
    "saga.resolved",
    "saga.rolled_back",
    "saga.started",
    "saga.step_completed",
    "saga.step_failed",
    "saga.step_reviewed",
    "saga.step_started",
    "saga.stuck",
    "task.status",
    "transaction",
]

EXAMPLES: dict[str, msgspec.Struct] = {
    "a2a.message": A2AMessage(
        type="task.request",
        payload={"question": "why?"},
        metadata=A2AMetadata(sender="planner-1", timestamp=WHEN),
    ),
    "agent.state_update": StateUpdate(
        agent_id="r1", state={"busy": True}, version=3, timestamp=WHEN
    ),
    "transaction": Transaction(id="tx-1", operations=[{"op": "reserve"}], status="committed"),
}

# Each: (type, a path into the encoded payload, what to do there) -> must be rejected.
BROKEN: list[tuple[str, tuple[str, ...], str, Any]] = [
    ("a2a.message", ("metadata", "sender"), "delete", None),
    ("a2a.message", ("metadata", "sender"), "set", 42),
    ("a2a.message", ("type",), "delete", None),
    ("a2a.message", ("payload",), "set", ["not", "an", "object"]),
    ("agent.state_update", ("agentId",), "delete", None),
    ("agent.state_update", ("version",), "set", "3"),
    ("agent.state_update", ("state",), "set", None),
    ("transaction", ("id",), "delete", None),
    ("transaction", ("status",), "set", "done"),
    ("transaction", ("operations",), "set", {"op": "reserve"}),
]


def fuse(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FUSE_")}
    return subprocess.run(
        [sys.executable, "-m", "newfuse", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("schemas") / "out"
    result = fuse("schemas", "export", str(directory))
    assert result.returncode == 0, result.stderr
    assert f"wrote {len(BUILT_IN) + 1} schemas and index.json" in result.stdout
    return directory


def _schema(directory: Path, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((directory / name).read_text(encoding="utf-8"))
    return loaded


def _payload_validator(directory: Path, type_name: str) -> Draft202012Validator:
    return Draft202012Validator(_schema(directory, f"{type_name}.v1.json"))


def _encoded(type_name: str) -> dict[str, Any]:
    wire: dict[str, Any] = msgspec.json.decode(
        default_registry().encode(type_name, 1, EXAMPLES[type_name])
    )
    return wire


def test_every_exported_file_is_a_valid_draft_2020_12_schema(exported: Path) -> None:
    index = _schema(exported, "index.json")
    files = [index["envelope"]["file"], *(entry["file"] for entry in index["types"])]
    assert sorted(path.name for path in exported.iterdir()) == sorted([*files, "index.json"])
    for name in files:
        schema = _schema(exported, name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)


def test_index_names_every_built_in_type_and_the_wire_contract(exported: Path) -> None:
    index = _schema(exported, "index.json")
    assert [(entry["type"], entry["version"]) for entry in index["types"]] == [
        (name, 1) for name in BUILT_IN
    ]
    assert index["wire"]["subjects"]["events"] == "<prefix>.ev.<category>.<id>"
    assert "Nats-Expected-Last-Subject-Sequence" in index["wire"]["headers"]


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_an_encoded_example_of_each_type_validates(exported: Path, type_name: str) -> None:
    _payload_validator(exported, type_name).validate(_encoded(type_name))


@pytest.mark.parametrize(
    ("type_name", "path", "action", "value"),
    BROKEN,
    ids=[f"{t}-{action}-{'.'.join(path)}" for t, path, action, _ in BROKEN],
)
def test_a_broken_example_is_rejected(
    exported: Path, type_name: str, path: tuple[str, ...], action: str, value: Any
) -> None:
    wire = _encoded(type_name)
    parent = wire
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    errors = list(_payload_validator(exported, type_name).iter_errors(wire))
    assert errors, f"{type_name} with {action} at {'.'.join(path)} was accepted"


def test_a_full_encoded_envelope_validates_and_a_broken_one_does_not(exported: Path) -> None:
    envelope = Envelope(
        id=new_event_id(),
        stream="agent.r1",
        type="agent.state_update",
        version=1,
        timestamp=WHEN,
        correlation_id="conv-1",
        causation_id="cmd-1",
        trace=TraceContext(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        metadata={"tenant": "acme"},
        data=msgspec.Raw(
            default_registry().encode("agent.state_update", 1, EXAMPLES["agent.state_update"])
        ),
    )
    wire = msgspec.json.decode(ENVELOPE_ENCODER.encode(envelope))
    validator = Draft202012Validator(_schema(exported, "envelope.v1.json"))
    validator.validate(wire)
    for key, value in (("version", "1"), ("trace", {"tracestate": "x"}), ("stream", None)):
        assert not validator.is_valid({**wire, key: value}), key
    for key in ("id", "stream", "type", "version", "timestamp", "data"):
        assert not validator.is_valid({k: v for k, v in wire.items() if k != key}), key


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda path: path.name)
def test_golden_samples_validate_against_the_exported_schemas(exported: Path, path: Path) -> None:
    wire = json.loads(path.read_bytes())
    Draft202012Validator(_schema(exported, "envelope.v1.json")).validate(wire)
    schema_file = exported / f"{wire['type']}.v{wire.get('schema_version', 1)}.json"
    if schema_file.exists():
        Draft202012Validator(_schema(exported, schema_file.name)).validate(wire["data"])


def test_export_twice_gives_byte_identical_files(exported: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    result = fuse("schemas", "export", str(again), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["directory"] == str(again)
    assert [entry["file"] for entry in report["schemas"]] == [
        "envelope.v1.json",
        *(f"{name}.v1.json" for name in BUILT_IN),
    ]
    for path in sorted(exported.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_list_prints_types_as_a_table_and_as_json() -> None:
    table = fuse("schemas", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TYPE", "VERSION", "LATEST", "UPCASTS", "TO", "STRUCT"]
    assert [line.split()[0] for line in lines[2:]] == BUILT_IN
    as_json = fuse("schemas", "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout.splitlines()[8]) == {
        "type": "agent.state_update",
        "version": 1,
        "latest": True,
        "struct": "newfuse.schemas.payloads.StateUpdate",
        "upcasts_to": None,
    }


def test_a_project_registry_is_exported_with_its_versions_and_upcasters(tmp_path: Path) -> None:
    (tmp_path / "myevents.py").write_text(
        "import msgspec\n"
        "from newfuse.schemas import default_registry\n"
        "registry = default_registry()\n"
        "@registry.register('order.placed', 1)\n"
        "class OrderV1(msgspec.Struct):\n"
        "    id: str\n"
        "@registry.register('order.placed', 2)\n"
        "class OrderV2(msgspec.Struct):\n"
        "    order_id: str\n"
        "@registry.upcaster('order.placed', 1)\n"
        "def up(v1):\n"
        "    return {'order_id': v1['id']}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = fuse("schemas", "export", str(out), "--registry", "myevents:registry", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    index = _schema(out, "index.json")
    assert index["upcasters"] == [{"type": "order.placed", "from_version": 1, "to_version": 2}]
    Draft202012Validator(_schema(out, "order.placed.v2.json")).validate({"order_id": "o-1"})
    assert not Draft202012Validator(_schema(out, "order.placed.v2.json")).is_valid({"id": "o-1"})
    listing = fuse("schemas", "list", "--registry", "myevents:registry", cwd=tmp_path)
    (v1_row,) = [
        line for line in listing.stdout.splitlines() if line.split()[:2] == ["order.placed", "1"]
    ]
    assert "v2" in v1_row  # order.placed v1 upcasts to v2


def test_a_registry_that_cannot_be_found_is_a_clear_error(tmp_path: Path) -> None:
    result = fuse("schemas", "list", "--registry", "nosuchmodule:registry", cwd=tmp_path)
    assert result.returncode == 1
    assert "--registry='nosuchmodule:registry': cannot import 'nosuchmodule'" in result.stderr
    result = fuse("schemas", "list", "--registry", "json:dumps", cwd=tmp_path)
    assert result.returncode == 1
    assert "--registry='json:dumps': calling it raised TypeError" in result.stderr
    result = fuse("schemas", "export", str(tmp_path), "--registry", "json:__name__")
    assert result.returncode == 1
    assert "it is a str, not a SchemaRegistry or a function returning one" in result.stderr
    result = fuse("schemas", "list", "--registry", "json")
    assert result.returncode == 1
    assert "expected MODULE:NAME" in result.stderr


def test_export_to_a_place_that_cannot_hold_a_directory_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", "schemas", "export", str(blocker / "schemas")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot write the schemas there" in result.stderr
    assert "Traceback" not in result.stderr
