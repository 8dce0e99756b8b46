"""Settings from FUSE_* environment variables: defaults < environment < explicit arguments.

Settings are built once (usually by the CLI or the caller's `main`) and passed in; no module
reads the environment on its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from newfuse.errors import ConfigError

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
        if self.health_addr is not None:
            split_address(self.health_addr, variable="FUSE_HEALTH_ADDR")
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
            if field == "connect_timeout":
                try:
                    values[field] = float(raw)
                except ValueError:
                    raise ConfigError(
                        variable=variable, value=raw, reason="must be a number of seconds"
                    ) from None
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
}


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
