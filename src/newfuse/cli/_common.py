"""What every `fuse` subcommand shares: settings, the `fuse dev` state file, tables, progress."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec

from newfuse.config import Settings
from newfuse.errors import DevProcessGoneError, NoDevServerError

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


def print_table(
    rows: Sequence[Sequence[Any]], headers: Sequence[str], out: TextIO = sys.stdout
) -> None:
    """A plain aligned table for people; long cells are cut to fit the terminal."""
    width = shutil.get_terminal_size((160, 24)).columns
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    budget = max(width - 2 * (len(headers) - 1), 20)
    while sum(widths) > budget and max(widths) > 12:
        widest = widths.index(max(widths))
        widths[widest] -= 1
    for index, row in enumerate(cells):
        line = "  ".join(
            (c if len(c) <= w else c[: w - 1] + "…").ljust(w)
            for c, w in zip(row, widths, strict=True)
        )
        out.write(line.rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


class Progress:
    """A progress line on stderr for long operations (only when stderr is a terminal, or forced).

    `total` may be unknown (None): then it counts and shows a rate.
    """

    def __init__(
        self, label: str, total: int | None = None, *, enabled: bool | None = None
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._started = time.monotonic()
        self._last_draw = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= 0.1:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            bar = "#" * int(fraction * 30)
            text = f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {rate:,.0f}/s"
        else:
            text = f"\r{self.label} {self.done} {rate:,.0f}/s"
        sys.stderr.write(text)
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()
