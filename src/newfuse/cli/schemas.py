"""`fuse schemas export DIR` and `fuse schemas list`: the registered types as JSON Schema."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import msgspec

from newfuse.cli._common import Commands, load_attribute
from newfuse.cli._output import print_json, print_table
from newfuse.errors import ConfigError
from newfuse.schemas import ExportedSchema, SchemaRegistry, default_registry, export_schemas
from newfuse.schemas.export import DEFAULT_BASE_URI, INDEX_FILE, JSON_SCHEMA_DIALECT


def register(commands: Commands) -> None:
    """Add `fuse schemas export` and `fuse schemas list` to the `fuse` command."""
    parser = commands.add_parser(
        "schemas",
        description="The envelope and the registered payload types, as JSON Schema.",
    )
    actions = parser.add_subparsers(dest="schemas_command", metavar="ACTION", required=True)

    export = actions.add_parser(
        "export",
        help="write one JSON Schema per type and version, plus index.json",
        description=(
            "Write envelope.v1.json, <type>.v<version>.json for every registered payload type "
            f"and version, and {INDEX_FILE} (types, upcasters, wire contract) into DIR. Schemas "
            "use JSON Schema Draft 2020-12; re-exporting gives byte-identical files."
        ),
    )
    export.add_argument("directory", metavar="DIR", type=Path, help="output directory")
    export.add_argument(
        "--base-uri",
        default=DEFAULT_BASE_URI,
        help=f"prefix of each schema's $id (default: {DEFAULT_BASE_URI})",
    )
    _add_common(export)
    export.set_defaults(handler=run_export)

    listing = actions.add_parser(
        "list",
        help="list the registered types and versions",
        description="List every registered payload type, version, struct and upcaster.",
    )
    _add_common(listing)
    listing.set_defaults(handler=run_list)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry",
        metavar="MODULE:NAME",
        help=(
            "a SchemaRegistry (or a function returning one) to use instead of the built-in "
            "types, e.g. myapp.events:registry"
        ),
    )


def load_registry(spec: str | None) -> SchemaRegistry:
    """The registry named by `module:attribute` (an instance or a factory), or the built-in one.

    The current directory is importable, as with `python -m`.

    Raises:
        ConfigError: the module or attribute cannot be found, or is not a SchemaRegistry.
    """
    if spec is None:
        return default_registry()
    found = load_attribute(spec, option="--registry", example="myapp.events:registry")
    if not isinstance(found, SchemaRegistry) and callable(found):
        try:
            found = found()
        except Exception as error:
            raise ConfigError(
                variable="--registry",
                value=spec,
                reason=f"calling it raised {type(error).__name__}: {error}",
            ) from error
    if not isinstance(found, SchemaRegistry):
        raise ConfigError(
            variable="--registry",
            value=spec,
            reason=f"it is a {type(found).__name__}, not a SchemaRegistry or a function "
            f"returning one",
        )
    return found


async def run_export(args: argparse.Namespace) -> int:
    """Write the schemas and index.json; print what was written."""
    registry = load_registry(args.registry)
    directory: Path = args.directory
    try:
        written: list[ExportedSchema] = await asyncio.to_thread(
            export_schemas, directory, registry, base_uri=args.base_uri
        )
    except OSError as error:
        raise ConfigError(
            variable="DIR",
            value=str(directory),
            reason=f"cannot write the schemas there ({error.strerror or error}); give a "
            f"directory you can write to (it is created if missing)",
        ) from None
    if args.json:
        report = {
            "directory": str(directory),
            "dialect": JSON_SCHEMA_DIALECT,
            "index": INDEX_FILE,
            "schemas": msgspec.to_builtins(written),
        }
        print_json(report)
        return 0
    print_table(
        [(entry.file, entry.type, entry.version, _yes(entry.latest)) for entry in written],
        ("FILE", "TYPE", "VERSION", "LATEST"),
    )
    print(f"wrote {len(written)} schemas and {INDEX_FILE} to {directory} (JSON Schema 2020-12)")
    return 0


async def run_list(args: argparse.Namespace) -> int:
    """Print the registered types, versions, structs and upcasters."""
    registry = load_registry(args.registry)
    upcasts = dict.fromkeys(registry.upcasters(), True)
    rows: list[dict[str, Any]] = []
    for type_name, version, cls in registry.types():
        rows.append(
            {
                "type": type_name,
                "version": version,
                "latest": version == registry.latest_version(type_name),
                "struct": f"{cls.__module__}.{cls.__qualname__}",
                "upcasts_to": version + 1 if (type_name, version) in upcasts else None,
            }
        )
    if args.json:
        for row in rows:
            print_json(row)
        return 0
    print_table(
        [
            (
                row["type"],
                row["version"],
                _yes(row["latest"]),
                f"v{row['upcasts_to']}" if row["upcasts_to"] else "",
                row["struct"],
            )
            for row in rows
        ],
        ("TYPE", "VERSION", "LATEST", "UPCASTS TO", "STRUCT"),
    )
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else ""
