"""Settings from FUSE_* environment variables: defaults < environment < explicit arguments.

Settings are built once (usually by the CLI or the caller's `main`, with `load_settings`) and
passed in; no other module reads the environment on its own. What is not configured comes from
the running `fuse dev` (its state file), by the one resolver here that the CLI and the API share.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from newfuse.errors import ConfigError, DevProcessGoneError, NoDevServerError

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "newfuse")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything newfuse needs to find its servers and name its subjects.

    Attributes:
        nats_url: NATS server(s), comma separated; None means "use a running `fuse dev`".
        redis_url: Redis-protocol server for read models; None as for nats_url.
        store: event store URL (`nats://...`, `sqlite:///path`, `sqlite://:memory:`); None means
            the JetStream store on `nats_url`.
        prefix: first token of every subject and of the JetStream stream name.
        audit_db: SQLite file of the audit index (and other SQLite read models); None means
            the running `fuse dev`'s.
        state_dir: where `fuse dev` records the URLs of the servers it runs.
        connect_timeout: seconds allowed to reach a server.
        health_addr: `host:port` where a long-running process serves /healthz, /readyz and
            /metrics (port 0: a free one); None: no such server.
        otlp_endpoint: base URL of an OpenTelemetry collector's OTLP/HTTP receiver (e.g.
            `http://collector:4318`); traces and metrics go to `/v1/traces` and `/v1/metrics`
            under it. None: nothing is exported. `OTEL_EXPORTER_OTLP_ENDPOINT` is used when
            `FUSE_OTLP_ENDPOINT` is not set.
        replicas: copies of the JetStream stream when a store creates it; None: 3 on a cluster
            of 3 or more nodes (else the node count), 1 on a single server. An existing stream
            keeps the count it has.
        election_timeout: seconds an operation of the JetStream store rides out a leader
            election or a reconnect (retrying with the same event ids) before it fails with a
            retryable error.
        nats_credentials: a credentials file of `fuse auth add` (the identity to connect as);
            None: a running `fuse dev --secure`'s admin when its servers are used, else none.
        nats_ca: the CA certificate (PEM file) NATS servers' TLS certificates are verified
            with; given, connections are TLS (a `nats://` URL is upgraded). None: the `ca` of
            the credentials file, else a running `fuse dev --tls`'s when its servers are used,
            else TLS only for `tls://` URLs (against the system's CAs).
    """

    nats_url: str | None = None
    redis_url: str | None = None
    store: str | None = None
    prefix: str = "fuse"
    audit_db: str | None = None
    state_dir: str = msgspec.field(default_factory=_default_state_dir)
    connect_timeout: float = 5.0
    health_addr: str | None = None
    otlp_endpoint: str | None = None
    replicas: int | None = None
    election_timeout: float = 15.0
    nats_credentials: str | None = None
    nats_ca: str | None = None

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigError(
                variable="FUSE_PREFIX",
                value=self.prefix,
                reason="use letters, digits, '-' and '_' only (it becomes a subject token)",
            )
        if self.connect_timeout <= 0:
            raise ConfigError(
                variable="FUSE_CONNECT_TIMEOUT",
                value=self.connect_timeout,
                reason="must be a positive number of seconds",
            )
        if self.replicas is not None and not 1 <= self.replicas <= 5:
            raise ConfigError(
                variable="FUSE_REPLICAS",
                value=self.replicas,
                reason="JetStream keeps 1 to 5 copies of a stream; use 3 on a 3-node cluster",
            )
        if self.election_timeout <= 0:
            raise ConfigError(
                variable="FUSE_ELECTION_TIMEOUT",
                value=self.election_timeout,
                reason="must be a positive number of seconds (elections take a few seconds: "
                "10 or more)",
            )
        if self.health_addr is not None:
            split_address(self.health_addr, variable="FUSE_HEALTH_ADDR")
        if self.nats_ca is not None:
            _check_readable(self.nats_ca, variable="FUSE_NATS_CA")
        for variable, url, schemes in (
            ("FUSE_NATS_URL", self.nats_url, ("nats", "tls", "ws", "wss")),
            ("FUSE_REDIS_URL", self.redis_url, ("redis", "rediss", "unix")),
            ("FUSE_STORE", self.store, ("nats", "tls", "sqlite")),
            ("FUSE_OTLP_ENDPOINT", self.otlp_endpoint, ("http", "https")),
        ):
            if url is not None and url.split("://", 1)[0] not in schemes:
                raise ConfigError(
                    variable=variable,
                    value=url,
                    reason="expected a URL starting with "
                    + ", ".join(f"{scheme}://" for scheme in schemes),
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `environ` (default: os.environ); non-None overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, variable in _VARIABLES.items():
            raw = env.get(variable)
            if raw is None or raw == "":
                continue
            if field in ("connect_timeout", "election_timeout"):
                try:
                    values[field] = float(raw)
                except ValueError:
                    raise ConfigError(
                        variable=variable, value=raw, reason="must be a number of seconds"
                    ) from None
            elif field == "replicas":
                if not raw.strip().isdigit():
                    raise ConfigError(
                        variable=variable, value=raw, reason="must be a whole number, 1 to 5"
                    )
                values[field] = int(raw)
            else:
                values[field] = raw
        if "otlp_endpoint" not in values and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            # the standard variable of every OpenTelemetry SDK, so a collector set up for other
            # services is found without a newfuse-specific one
            values["otlp_endpoint"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_VARIABLES: dict[str, str] = {
    "nats_url": "FUSE_NATS_URL",
    "redis_url": "FUSE_REDIS_URL",
    "store": "FUSE_STORE",
    "prefix": "FUSE_PREFIX",
    "audit_db": "FUSE_AUDIT_DB",
    "state_dir": "FUSE_STATE_DIR",
    "connect_timeout": "FUSE_CONNECT_TIMEOUT",
    "health_addr": "FUSE_HEALTH_ADDR",
    "otlp_endpoint": "FUSE_OTLP_ENDPOINT",
    "replicas": "FUSE_REPLICAS",
    "election_timeout": "FUSE_ELECTION_TIMEOUT",
    "nats_credentials": "FUSE_NATS_CREDENTIALS",
    "nats_ca": "FUSE_NATS_CA",
}


def _check_readable(path: str, *, variable: str) -> None:
    """Fail now, naming the variable, rather than at the first connect with a TLS error."""
    where = Path(path)
    if not where.is_file():
        raise ConfigError(
            variable=variable,
            value=path,
            reason="no such file: give the CA certificate (PEM) that signed the server's "
            "certificate (`fuse dev --tls` prints its FUSE_NATS_CA=)",
        )
    if not os.access(where, os.R_OK):
        raise ConfigError(
            variable=variable, value=path, reason="cannot be read (check its permissions)"
        )


def split_address(address: str, *, variable: str = "--health") -> tuple[str, int]:
    """(host, port) of `host:port` (`[::1]:port` for IPv6; port 0 asks for a free one).

    Raises:
        ConfigError: not `host:port`, or the port is not 0-65535.
    """
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            variable=variable,
            value=address,
            reason="expected host:port, e.g. 127.0.0.1:9464 (port 0 picks a free port; "
            "0.0.0.0:9464 to be reachable from other hosts, as Kubernetes probes need)",
        )
    return host, int(port)


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
    credentials: str | None = None
    """The admin's credentials file when it runs with `--secure` (None: no authentication)."""
    ca: str | None = None
    """The CA certificate its nats-server's is signed by, with `--tls` (None: no TLS)."""


def process_started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (None where /proc has no answer)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


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


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """defaults < FUSE_* environment < non-None `overrides` (the CLI's global flags).

    With no prefix given (override or FUSE_PREFIX) and no NATS URL configured, the prefix of the
    running `fuse dev` is used too, so `fuse dev --prefix x` needs no flag on later commands.
    """
    env = os.environ if environ is None else environ
    settings = Settings.from_env(env, **overrides)
    if not overrides.get("prefix") and not env.get("FUSE_PREFIX") and not settings.nats_url:
        state = read_dev_state(settings)
        if state is not None and state.prefix != settings.prefix:
            settings = msgspec.structs.replace(settings, prefix=state.prefix)
    return settings


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


def resolve_nats_credentials(settings: Settings) -> str | None:
    """FUSE_NATS_CREDENTIALS / --credentials, else the admin's of a running `fuse dev --secure`
    when its servers are the ones used (no FUSE_NATS_URL), else None (anonymous)."""
    if settings.nats_credentials:
        return settings.nats_credentials
    if settings.nats_url:
        return None
    state = read_dev_state(settings)
    return state.credentials if state is not None else None


def resolve_nats_ca(settings: Settings) -> str | None:
    """FUSE_NATS_CA / --ca, else the CA of a running `fuse dev --tls` when its servers are the
    ones used (no FUSE_NATS_URL), else None (a credentials file's `ca` may still give one)."""
    if settings.nats_ca:
        return settings.nats_ca
    if settings.nats_url:
        return None
    state = read_dev_state(settings)
    return state.ca if state is not None else None


def resolve_store_url(settings: Settings) -> str:
    """FUSE_STORE / --store, else JetStream on the resolved NATS URL."""
    return settings.store or resolve_nats_url(settings)
