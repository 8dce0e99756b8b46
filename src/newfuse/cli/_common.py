"""What every `fuse` subcommand shares: settings, the `fuse dev` state file, argument types."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from newfuse._files import write_private

# The dev state and the URL resolvers live in the library so the API resolves as the CLI does;
# re-exported here for the commands.
from newfuse.config import DEV_STATE_FILE as DEV_STATE_FILE
from newfuse.config import DevServer as DevServer
from newfuse.config import DevState as DevState
from newfuse.config import Settings, load_settings
from newfuse.config import dev_state_path as dev_state_path
from newfuse.config import process_started as process_started
from newfuse.config import read_dev_state as read_dev_state
from newfuse.config import recorded_dev_state as recorded_dev_state
from newfuse.config import resolve_audit_db as resolve_audit_db
from newfuse.config import resolve_nats_ca as resolve_nats_ca
from newfuse.config import resolve_nats_credentials as resolve_nats_credentials
from newfuse.config import resolve_nats_url as resolve_nats_url
from newfuse.config import resolve_redis_url as resolve_redis_url
from newfuse.config import resolve_store_url as resolve_store_url
from newfuse.errors import ConfigError, KeyStoreMissingError
from newfuse.eventstore import EventStore, open_event_store

if TYPE_CHECKING:
    from nats.aio.client import Client

    from newfuse.nats.connection import Credentials
    from newfuse.security import SubjectCipher


class Commands(Protocol):
    """What a command module's `register(commands)` adds its subcommands to."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def _replicas_flag(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.strip().isdigit():
        raise ConfigError(
            variable="--replicas", value=text, reason="must be a whole number, 1 to 5"
        )
    return int(text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """defaults < FUSE_* environment < global flags (see `newfuse.config.load_settings`)."""
    return load_settings(
        nats_url=getattr(args, "nats", None),
        redis_url=getattr(args, "redis", None),
        store=getattr(args, "store", None),
        prefix=getattr(args, "prefix", None),
        audit_db=getattr(args, "audit_db", None),
        replicas=_replicas_flag(getattr(args, "replicas", None)),
        nats_credentials=getattr(args, "credentials", None),
        nats_ca=getattr(args, "ca", None),
    )


def nats_credentials(settings: Settings) -> Credentials | None:
    """The identity to connect as (`--credentials`, FUSE_NATS_CREDENTIALS, or a secure
    `fuse dev`'s admin), None for none."""
    from newfuse.nats.connection import Credentials

    path = resolve_nats_credentials(settings)
    return None if path is None else Credentials.load(path)


def write_dev_state(settings: Settings, state: DevState) -> Path:
    path = dev_state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    # owner-only: a secure dev's Redis URL carries the admin's password
    write_private(path, msgspec.json.encode(state))
    return path


async def open_store(args: argparse.Namespace, *, create: bool) -> EventStore:
    """The event store the settings name, with its key store (sealed fields open, or read as
    redacted once forgotten); a command that only reads passes `create=False`, so a mistyped
    prefix or path is an error naming what exists instead of a new, empty store."""
    from newfuse.security import with_keys  # sealed fields open with the deployment's keys

    settings = settings_from_args(args)
    url = resolve_store_url(settings)
    options: dict[str, Any] = {}
    if not url.startswith("sqlite:"):
        options["credentials"] = nats_credentials(settings)
        options["ca"] = resolve_nats_ca(settings)
    store = await open_event_store(
        url,
        **options,
        prefix=settings.prefix,
        create=create,
        replicas=settings.replicas,
        election_timeout=settings.election_timeout,
    )
    return await with_keys(store, settings, create=create)


@contextlib.asynccontextmanager
async def message_stream(
    args: argparse.Namespace, *, name: str
) -> AsyncIterator[tuple[Client, str]]:
    """A connection and the prefix, for a command on the A2A message stream that exists (a
    command never creates it: a wrong prefix is an error naming the prefixes there are)."""
    from newfuse.nats import MessageStreamSpec, Subjects, connect, ensure_event_stream

    settings = settings_from_args(args)
    nc = await connect(
        resolve_nats_url(settings),
        name=name,
        credentials=nats_credentials(settings),
        ca=resolve_nats_ca(settings),
    )
    try:
        spec = MessageStreamSpec(subjects=Subjects(settings.prefix))
        await ensure_event_stream(nc, spec, create=False)
        yield nc, settings.prefix
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def message_keys(nc: Client, prefix: str) -> AsyncIterator[SubjectCipher | None]:
    """The deployment's keys (the bucket `<prefix>_keys`, which an admin may read), so that
    sealed values of messages show opened; None when there is no bucket (nothing was sealed
    with it: they read as redacted, as an event store without keys reads them)."""
    from newfuse.security import KVKeyStore, SubjectCipher  # cryptography: only when reading

    try:
        keys = await KVKeyStore.open(nc, prefix, create=False)
    except KeyStoreMissingError:
        yield None
        return
    cipher = SubjectCipher(keys, owns_keys=True)
    try:
        yield cipher
    finally:
        await cipher.close()


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def count_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(value: str, *, flag: str) -> datetime:
    """`2026-11-24T10:00:00Z`, `2026-11-24` or relative `10m` (ago) as an aware datetime."""
    match = _RELATIVE.match(value.strip())
    if match:
        delta = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        return datetime.now(UTC) - delta
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            variable=flag,
            value=value,
            reason="use an ISO time (2026-11-24T10:00:00Z) or a relative one (30s, 10m, 2h, 7d)",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def optional_time(value: str | None, *, flag: str) -> datetime | None:
    """`parse_time` of a flag that may be absent."""
    return None if value is None else parse_time(value, flag=flag)


def read_data(value: str, *, flag: str = "--data") -> bytes:
    """A payload argument: the JSON itself, `-` for standard input, or `@path` for a file."""
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        path = value[1:]
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise ConfigError(
                variable=flag,
                value=value,
                reason=f"cannot read {path!r} ({error.strerror or error}); give @PATH of a "
                "readable file, '-' for standard input, or the JSON itself",
            ) from None
    return value.encode()


def load_attribute(spec: str, *, option: str, example: str) -> Any:
    """The object named by `module:attribute`; the current directory is importable, as with
    `python -m`.

    Raises:
        ConfigError: `spec` is not MODULE:NAME, the module does not import, or has no NAME.
    """
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(
            variable=option, value=spec, reason=f"expected MODULE:NAME, e.g. {example}"
        )
    if os.getcwd() not in sys.path:  # as `python -m` does, so `fuse` finds the project's modules
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            variable=option, value=spec, reason=f"cannot import {module_name!r}: {error}"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(
            variable=option, value=spec, reason=f"{module_name} has no {attribute!r}"
        ) from None
