"""The event store: one contract (base.py), backends by technology, a factory choosing by URL."""

from __future__ import annotations

from typing import Any

from newfuse.config import (
    Settings,
    load_settings,
    resolve_nats_ca,
    resolve_nats_credentials,
    resolve_store_url,
)
from newfuse.errors import UnsupportedStoreError
from newfuse.eventstore.base import (
    ANY,
    MAX_BATCH,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventFilter,
    EventStore,
    Expected,
    ExpectedVersion,
    InvalidEventReport,
    StoredRecord,
    StreamInfo,
    Subscription,
    parse_expected,
)
from newfuse.schemas import SchemaRegistry


async def open_event_store(
    url: str | None = None,
    *,
    prefix: str | None = None,
    settings: Settings | None = None,
    registry: SchemaRegistry | None = None,
    replicas: int | None = None,
    election_timeout: float | None = None,
    **options: Any,
) -> EventStore:
    """Open the backend that `url` names; backends are imported only when used.

    - `nats://host:port` (several comma separated): JetStream, subjects under `prefix`;
      `replicas` and `election_timeout` are its options (None: the settings' when given, else
      its defaults), which the SQLite backend has no use for;
    - `sqlite:///abs/path.db`, `sqlite://rel/path.db`, `sqlite://:memory:`: SQLite;
    - no `url`: the store the `fuse` CLI would open, from `settings` (default: `load_settings()`,
      i.e. FUSE_STORE, else FUSE_NATS_URL, else the running `fuse dev`; its prefix likewise).

    `prefix` defaults to the settings' prefix (given or loaded), else `fuse`. `create=False` (an
    option of both backends) opens only a store that exists: a reader that names a prefix or
    file by mistake gets StoreNotFoundError instead of a new, empty store.
    """
    if url is None:
        settings = settings or load_settings()
        url = resolve_store_url(settings)
    prefix = prefix or (settings.prefix if settings is not None else "fuse")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("nats", "tls"):
        from newfuse.eventstore.jetstream import JetStreamEventStore
        from newfuse.nats.connection import Credentials

        if settings is not None:
            replicas = settings.replicas if replicas is None else replicas
            election_timeout = election_timeout or settings.election_timeout
        if election_timeout is not None:
            options["election_timeout"] = election_timeout
        if settings is not None and "credentials" not in options:
            path = resolve_nats_credentials(settings)
            if path is not None:
                options["credentials"] = Credentials.load(path)
        if settings is not None and "ca" not in options:
            options["ca"] = resolve_nats_ca(settings)
        return await JetStreamEventStore.connect(
            url, prefix=prefix, registry=registry, replicas=replicas, **options
        )
    if scheme == "sqlite":
        from newfuse.eventstore.sqlite import SQLiteEventStore

        path = url[len("sqlite://") :]
        if not path:
            raise UnsupportedStoreError(url=url)
        return await SQLiteEventStore.open(path, registry=registry, **options)
    raise UnsupportedStoreError(url=url)


__all__ = [
    "ANY",
    "MAX_BATCH",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "EventFilter",
    "EventStore",
    "Expected",
    "ExpectedVersion",
    "InvalidEventReport",
    "StoredRecord",
    "StreamInfo",
    "Subscription",
    "open_event_store",
    "parse_expected",
]
