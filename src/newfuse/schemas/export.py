"""JSON Schema export: a Draft 2020-12 schema per payload type and version, envelope, index.

Other languages validate with these files and need nothing of ours: a body that validates against
`envelope.v1.json`, whose `data` validates against `<type>.v<schema_version>.json`, is accepted
like one we wrote. Output is deterministic (sorted keys, cleaned docstrings, fixed indentation),
so exporting twice gives byte-identical files and a diff shows real schema changes only.
"""

from __future__ import annotations

import inspect
import json
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from newfuse.errors import SchemaRegistrationError
from newfuse.schemas.envelope import Envelope
from newfuse.schemas.registry import SchemaRegistry, default_registry
from newfuse.schemas.sealed import mark_sealed_properties

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
"""The `$schema` of every exported file: msgspec emits Draft 2020-12 (and OpenAPI 3.1)."""

DEFAULT_BASE_URI: Final = "urn:newfuse:schema:"
"""Prefix of each file's `$id`; pass a URL ending in `/` to publish the schemas over HTTP."""

ENVELOPE_FILE: Final = "envelope.v1.json"
INDEX_FILE: Final = "index.json"
ENVELOPE_SCHEMA_VERSION: Final = 1

_REF_TEMPLATE: Final = "#/$defs/{name}"

# The wire contract, as DESIGN.md states it. The header names are spelled out here rather than
# imported from newfuse.nats, because schemas sit below nats in the import order.
WIRE_CONTRACT: Final[dict[str, Any]] = {
    "body": (
        "UTF-8 JSON of the envelope (envelope.v1.json); its `data` validates against the "
        "schema of (`type`, `schema_version`) when that type is listed in `types`"
    ),
    "stream_name": "<category>.<id>",
    "subjects": {
        "events": "<prefix>.ev.<category>.<id>",
        "a2a": "<prefix>.a2a.<agent-id>",
        "tasks": "<prefix>.task.<queue>.<priority>",
    },
    "default_prefix": "fuse",
    "token_rules": (
        "prefix, category, id, agent, queue: not empty; no '.', ' ', '*', '>' or control "
        "characters; a type name is such tokens joined by '.'"
    ),
    "headers": {
        "Nats-Msg-Id": "the envelope's `id` (UUIDv7); JetStream deduplicates retries by it",
        "Fuse-Type": "the envelope's `type`",
        "Fuse-Schema-Version": "the envelope's `schema_version`, in decimal",
        "Fuse-Stream-Version": "the envelope's `version` (1-based place in its stream), decimal",
        "Nats-Expected-Last-Subject-Sequence": (
            "optimistic concurrency on append: the JetStream sequence the subject's last message "
            "must have (0: no message yet); otherwise the server rejects the publish"
        ),
        "traceparent": "W3C trace context, when tracing (also in the envelope's `trace`)",
        "tracestate": "W3C trace state, when tracing",
    },
    "unregistered_types": (
        "a type not listed in `types` is stored and delivered as raw JSON, unless its category "
        "is declared strict"
    ),
    "unknown_fields": "readers ignore fields they do not know; new fields get defaults",
    "versions": (
        "a breaking payload change is a new schema version; readers upcast older versions to "
        "the newest (see `upcasters`)"
    ),
}


class ExportedSchema(msgspec.Struct, frozen=True, kw_only=True):
    """One schema file that export wrote (or would write), as listed in index.json.

    Attributes:
        kind: `envelope` or `payload`.
        type: the event type name (`envelope` for the envelope).
        version: the schema version.
        file: the file name inside the export directory.
        id: the schema's `$id`.
        struct: the Python struct it was generated from (`module.QualName`).
        latest: whether this is the newest version of its type (the one readers decode into).
    """

    kind: Literal["envelope", "payload"]
    type: str
    version: int
    file: str
    id: str
    struct: str
    latest: bool


def schema_file_name(type_name: str, version: int) -> str:
    """The file name of a payload schema: `<type>.v<version>.json`, e.g. `a2a.message.v1.json`."""
    return f"{type_name}.v{version}.json"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _clean_descriptions(node: Any) -> Any:
    """Dedent docstring-derived descriptions: Python 3.13 strips indentation, 3.11 does not."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_clean_descriptions(item) for item in node]
    return node


def _struct_schema(
    cls: type[msgspec.Struct], *, schema_id: str, title: str, description: str
) -> dict[str, Any]:
    (root,), components = msgspec.json.schema_components([cls], ref_template=_REF_TEMPLATE)
    schema: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": schema_id,
        "title": title,
        "description": description,
        **root,
        "$defs": components,
    }
    cleaned: dict[str, Any] = _clean_descriptions(schema)
    return cleaned


def payload_schema(
    type_name: str, version: int, cls: type[msgspec.Struct], *, base_uri: str = DEFAULT_BASE_URI
) -> dict[str, Any]:
    """The JSON Schema of one payload struct, self-contained (`$defs` resolve in the file).

    Args:
        type_name: the event type the struct is registered as.
        version: its schema version.
        cls: the payload struct.
        base_uri: prefix of the `$id`.

    Returns:
        A JSON-able dict with `$schema` (Draft 2020-12), `$id`, a `$ref` to the struct's
        definition and `$defs`.
    """
    return _struct_schema(
        cls,
        schema_id=base_uri + schema_file_name(type_name, version),
        title=f"{type_name} v{version}",
        description=(
            f"Payload (`data`) of a newfuse event of type `{type_name}`, schema version "
            f"{version} ({_qualified(cls)})."
        ),
    )


def envelope_schema(*, base_uri: str = DEFAULT_BASE_URI) -> dict[str, Any]:
    """The JSON Schema of the envelope; its `data` may be any JSON value.

    Args:
        base_uri: prefix of the `$id`.

    Returns:
        A JSON-able dict; `data` is validated separately with the payload schema its `type` and
        `schema_version` name.
    """
    schema = _struct_schema(
        Envelope,
        schema_id=base_uri + ENVELOPE_FILE,
        title=f"envelope v{ENVELOPE_SCHEMA_VERSION}",
        description=(
            "Body of a newfuse event on `<prefix>.ev.<category>.<id>`: identity, place in its "
            "stream, lineage and the payload."
        ),
    )
    envelope = schema["$defs"][Envelope.__name__]
    envelope["properties"]["data"] = {
        "description": (
            "The payload: any JSON value. For a registered type it validates against "
            "`<type>.v<schema_version>.json` (see index.json)."
        )
    }
    return schema


def _newfuse_version() -> str:
    try:
        return package_version("newfuse")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree not installed
        return "unknown"


def build_export(
    registry: SchemaRegistry | None = None, *, base_uri: str = DEFAULT_BASE_URI
) -> dict[str, dict[str, Any]]:
    """Every file of an export, by file name: the envelope, each payload version, index.json.

    Args:
        registry: the types to export (default: newfuse's built-in types).
        base_uri: prefix of each schema's `$id`.

    Returns:
        File name -> JSON-able content, in a fixed order.

    Raises:
        SchemaRegistrationError: a registered type would be written to the envelope's file.
    """
    registry = default_registry() if registry is None else registry
    files: dict[str, dict[str, Any]] = {ENVELOPE_FILE: envelope_schema(base_uri=base_uri)}
    listed = [
        ExportedSchema(
            kind="envelope",
            type="envelope",
            version=ENVELOPE_SCHEMA_VERSION,
            file=ENVELOPE_FILE,
            id=base_uri + ENVELOPE_FILE,
            struct=_qualified(Envelope),
            latest=True,
        )
    ]
    for type_name, version, cls in registry.types():
        file = schema_file_name(type_name, version)
        if file in (ENVELOPE_FILE, INDEX_FILE):
            raise SchemaRegistrationError(
                type_name=type_name,
                version=version,
                reason=f"its schema file {file!r} is reserved for the envelope or the index; "
                f"rename the type",
            )
        files[file] = payload_schema(type_name, version, cls, base_uri=base_uri)
        plan = registry.sealed(type_name, version)
        if plan is not None:  # sealed fields are SealedValue objects on the wire
            mark_sealed_properties(files[file], plan, cls.__name__)
        listed.append(
            ExportedSchema(
                kind="payload",
                type=type_name,
                version=version,
                file=file,
                id=base_uri + file,
                struct=_qualified(cls),
                latest=version == registry.latest_version(type_name),
            )
        )
    files[INDEX_FILE] = {
        "generator": f"newfuse {_newfuse_version()}",
        "dialect": JSON_SCHEMA_DIALECT,
        "envelope": msgspec.to_builtins(listed[0]),
        "types": [msgspec.to_builtins(entry) for entry in listed[1:]],
        "upcasters": [
            {"type": type_name, "from_version": step, "to_version": step + 1}
            for type_name, step in registry.upcasters()
        ],
        "wire": WIRE_CONTRACT,
    }
    return files


def render(content: dict[str, Any]) -> bytes:
    """The bytes written for one file: UTF-8 JSON, sorted keys, 2-space indent, final newline."""
    return (json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def export_schemas(
    directory: str | Path,
    registry: SchemaRegistry | None = None,
    *,
    base_uri: str = DEFAULT_BASE_URI,
) -> list[ExportedSchema]:
    """Write the envelope schema, one schema per payload type and version, and index.json.

    Files are replaced atomically (written aside, then renamed); files of types no longer
    registered are left alone.

    Args:
        directory: where to write; created if missing.
        registry: the types to export (default: newfuse's built-in types).
        base_uri: prefix of each schema's `$id`.

    Returns:
        What was written, envelope first, then types by name and version (as in index.json).
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    files = build_export(registry, base_uri=base_uri)
    for name, content in files.items():
        path = target / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(render(content))
        tmp.replace(path)
    index = files[INDEX_FILE]
    entries = [index["envelope"], *index["types"]]
    return [msgspec.convert(entry, ExportedSchema) for entry in entries]
