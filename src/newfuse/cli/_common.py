"""What every `fuse` subcommand shares: settings, the `fuse dev` state file, argument types."""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import msgspec

from newfuse.config import Settings
from newfuse.errors import ConfigError, DevProcessGoneError, NoDevServerError
from newfuse.eventstore import EventStore, open_event_store


class Commands(Protocol):
    """What a command module's `register(commands)` adds its subcommands to."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


DEV_STATE_FILE = "dev.json"


class DevServer(msgspec.Struct, frozen=True, kw_only=True):
    """One server process of a `fuse dev`; rewritten when `fuse dev` restarts it."""

    name: str
    pid: int
    url: str
    data_dir: str
    restarts: int = 0
    last_exit: str | None = None


class DevState(msgspec.Struct, frozen=True, kw_only=True):
    """What a running `fuse dev` records so other commands find its servers.

    `started` is the process's start time (clock ticks since boot, Linux), so that another
    process that got the same pid later is not taken for it.
    """

    pid: int
    nats_url: str
    redis_url: str
    audit_db: str
    prefix: str
    data_dir: str
    started: int | None = None
    servers: tuple[DevServer, ...] = ()


def process_started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (None where /proc has no answer)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def settings_from_args(args: argparse.Namespace) -> Settings:
    """defaults < FUSE_* environment < global flags.

    With no prefix given (flag or FUSE_PREFIX) and no NATS URL configured, the prefix of the
    running `fuse dev` is used too, so `fuse dev --prefix x` needs no flag on later commands.
    """
    settings = Settings.from_env(
        nats_url=getattr(args, "nats", None),
        redis_url=getattr(args, "redis", None),
        store=getattr(args, "store", None),
        prefix=getattr(args, "prefix", None),
        audit_db=getattr(args, "audit_db", None),
    )
    prefix_given = getattr(args, "prefix", None) or os.environ.get("FUSE_PREFIX")
    if not prefix_given and not settings.nats_url:
        state = read_dev_state(settings)
        if state is not None and state.prefix != settings.prefix:
            settings = msgspec.structs.replace(settings, prefix=state.prefix)
    return settings


def dev_state_path(settings: Settings) -> Path:
    return Path(settings.state_dir) / DEV_STATE_FILE


def recorded_dev_state(settings: Settings) -> DevState | None:
    """What the state file records, whether or not that `fuse dev` still runs."""
    try:
        return msgspec.json.decode(dev_state_path(settings).read_bytes(), type=DevState)
    except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def read_dev_state(settings: Settings) -> DevState | None:
    """The state of a `fuse dev` that is still running, or None."""
    state = recorded_dev_state(settings)
    if state is None:
        return None
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if state.started is not None and process_started(state.pid) not in (None, state.started):
        return None  # the pid now belongs to another process
    return state


def write_dev_state(settings: Settings, state: DevState) -> Path:
    path = dev_state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    tmp.replace(path)
    return path


def _configured_or_dev(settings: Settings, value: str | None, field: str, what: str) -> str:
    """`value` when configured, else that field of the running `fuse dev`, else a clear error."""
    if value:
        return value
    state = read_dev_state(settings)
    if state is None:
        # Fail before any connection attempt: the servers of a dead `fuse dev` died with it
        # (parent-death signal), and a refused connect would only be retried until a timeout.
        recorded = recorded_dev_state(settings)
        if recorded is not None:
            raise DevProcessGoneError(
                what=what, pid=recorded.pid, state_file=str(dev_state_path(settings))
            )
        raise NoDevServerError(what=what, state_file=str(dev_state_path(settings)))
    found: str = getattr(state, field)
    return found


def resolve_nats_url(settings: Settings) -> str:
    """FUSE_NATS_URL / --nats, else the running `fuse dev`'s, else a clear error."""
    return _configured_or_dev(settings, settings.nats_url, "nats_url", "NATS server")


def resolve_redis_url(settings: Settings) -> str:
    """FUSE_REDIS_URL / --redis, else the running `fuse dev`'s, else a clear error."""
    return _configured_or_dev(settings, settings.redis_url, "redis_url", "Redis server")


def resolve_audit_db(settings: Settings) -> str:
    """FUSE_AUDIT_DB / --audit-db, else the running `fuse dev`'s, else a clear error."""
    return _configured_or_dev(settings, settings.audit_db, "audit_db", "audit database")


def resolve_store_url(settings: Settings) -> str:
    """FUSE_STORE / --store, else JetStream on the resolved NATS URL."""
    return settings.store or resolve_nats_url(settings)


async def open_store(args: argparse.Namespace, *, create: bool) -> EventStore:
    """The event store the settings name; a command that only reads passes `create=False`, so
    a mistyped prefix or path is an error naming what exists instead of a new, empty store."""
    settings = settings_from_args(args)
    return await open_event_store(
        resolve_store_url(settings), prefix=settings.prefix, create=create
    )


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
