"""Key stores: one AES-256 key per data subject, behind a small async interface.

`KeyStore` is the port (get, create, forget); a KMS fits it (create = generate a data key and
keep it wrapped, get = unwrap, forget = destroy). Two backends:

- `SQLiteKeyStore`: a local file (dev and tests), owner-only permissions, deleted rows zeroed
  (`secure_delete`), no WAL, so no copy of a forgotten key stays in the database file.
- `KVKeyStore`: a JetStream KV bucket (`<prefix>_keys`, history 1), so every process of a
  deployment shares keys; forgetting purges the key's subject (no revision keeps it), and every
  process drops its cached copy when it sees the purge.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import os
import secrets
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Final, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from newfuse._closing import AsyncClosing
from newfuse.errors import KeyStoreError, KeyStoreMissingError, KeyStoreUnavailableError
from newfuse.schemas import MAX_SUBJECT_CHARS, utcnow

_T = TypeVar("_T")

KEY_BYTES: Final = 32
"""AES-256."""


class SubjectKey(msgspec.Struct, frozen=True, kw_only=True):
    """The key of one data subject. `kid` is random: a subject forgotten and seen again gets a
    new key with a new id, and values sealed with the old one read as redacted."""

    subject: str
    kid: str
    key: bytes
    created: datetime

    def __repr__(self) -> str:  # the key never reaches a log or a traceback
        return f"SubjectKey(subject={self.subject!r}, kid={self.kid!r}, key=<hidden>)"


def new_key(subject: str) -> SubjectKey:
    """A fresh random key for `subject`."""
    return SubjectKey(
        subject=subject,
        kid=secrets.token_hex(8),
        key=secrets.token_bytes(KEY_BYTES),
        created=utcnow(),
    )


def check_subject(subject: str) -> str:
    """`subject` if it can name a key, else KeyStoreError saying why."""
    if not subject or len(subject) > MAX_SUBJECT_CHARS or not subject.isprintable():
        raise KeyStoreError(
            store="(any)",
            reason=f"data subject {subject!r:.80}: use 1 to {MAX_SUBJECT_CHARS} printable "
            f"characters",
        )
    return subject


class KeyStore(AsyncClosing, abc.ABC):
    """Keys by data subject. Implementations must make `create` safe against a concurrent
    create of the same subject (both callers get the one key stored)."""

    name: str = "key store"
    changed: Callable[[str], None] | None = None
    """Called with a subject whose key another process created or forgot (set by the cipher,
    so it drops its cached copy); stores that cannot see other processes never call it."""

    @abc.abstractmethod
    async def get(self, subject: str) -> SubjectKey | None:
        """The subject's key, None when it has none (never had one, or it was forgotten)."""

    @abc.abstractmethod
    async def create(self, subject: str) -> SubjectKey:
        """The subject's key, made now if it has none."""

    @abc.abstractmethod
    async def forget(self, subject: str) -> str | None:
        """Delete the subject's key for good; the id of the key deleted, None when there was
        none."""

    def generation(self) -> int:
        """Changes when the store may have missed telling `changed` (a reconnect): a cache
        built before must be dropped."""
        return 0

    async def close(self) -> None:
        """Release connections. Idempotent."""


_ENTRY = msgspec.json.Decoder(SubjectKey)
_ENCODE = msgspec.json.Encoder()


class SQLiteKeyStore(KeyStore):
    """Keys in a local SQLite file (created 0600 in a 0700 directory).

    One process at a time is the model (dev, tests, a single CLI): another process's forget is
    seen on its next `get`, not pushed to this one's cache. Calls run on a worker thread.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"sqlite:{self.path}"
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> SQLiteKeyStore:
        """Open (creating) the key file at `path`."""
        store = cls(path)
        await store._run(lambda db: None)
        return store

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            mode = self.path.stat().st_mode & 0o777
            if mode & 0o077:
                raise KeyStoreError(
                    store=self.name,
                    reason=f"the file is readable by others (mode {mode:o}); chmod 600 it",
                )
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA secure_delete = ON")  # a deleted key's bytes are overwritten
            db.execute("PRAGMA journal_mode = DELETE")  # no WAL holding old pages
            db.execute(
                "CREATE TABLE IF NOT EXISTS subject_keys (subject TEXT PRIMARY KEY, "
                "entry BLOB NOT NULL)"
            )
        except (OSError, sqlite3.Error) as error:
            raise KeyStoreError(store=self.name, reason=str(error)) from None
        self._db = db
        return db

    async def _run(self, call: Callable[[sqlite3.Connection], _T]) -> _T:
        async with self._lock:
            return await asyncio.to_thread(lambda: call(self._connect()))

    async def get(self, subject: str) -> SubjectKey | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT entry FROM subject_keys WHERE subject = ?", (subject,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        entry = await self._run(read)
        return None if entry is None else self._decode(entry)

    def _decode(self, entry: bytes) -> SubjectKey:
        try:
            return _ENTRY.decode(entry)
        except msgspec.ValidationError as error:
            raise KeyStoreError(store=self.name, reason=f"malformed entry: {error}") from None

    async def create(self, subject: str) -> SubjectKey:
        fresh = new_key(check_subject(subject))

        def insert(db: sqlite3.Connection) -> bytes:
            db.execute(
                "INSERT OR IGNORE INTO subject_keys VALUES (?, ?)", (subject, _ENCODE.encode(fresh))
            )
            row = db.execute(
                "SELECT entry FROM subject_keys WHERE subject = ?", (subject,)
            ).fetchone()
            return bytes(row[0])

        return self._decode(await self._run(insert))

    async def forget(self, subject: str) -> str | None:
        def delete(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "DELETE FROM subject_keys WHERE subject = ? RETURNING entry", (subject,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        entry = await self._run(delete)
        return None if entry is None else self._decode(entry).kid

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(db.close)


def _kv_key(subject: str) -> str:
    """A KV key for any subject: base64url (KV keys allow `[-/_=.A-Za-z0-9]`)."""
    return base64.urlsafe_b64encode(subject.encode()).decode()


def _subject_of(key: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(key).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def bucket_name(prefix: str) -> str:
    """The KV bucket of a prefix's keys: `<prefix>_keys`."""
    return f"{prefix}_keys"


class KVKeyStore(KeyStore):
    """Keys in a JetStream KV bucket shared by every process of a deployment.

    The bucket keeps one revision per key; `forget` purges the key's subject, which removes
    every stored revision (the purge marker holds no key). Each store listens on the bucket's
    subjects (core NATS) and tells `changed` of every put, delete and purge by anyone; after a
    reconnect (a notice may have been missed) `generation` changes.
    """

    def __init__(self, nc: Client, kv: KeyValue, bucket: str) -> None:
        self.nc = nc
        self.kv = kv
        self.bucket = bucket
        self.name = f"KV bucket {bucket!r}"
        self._listener: object | None = None

    @classmethod
    async def open(
        cls, nc: Client, prefix: str = "fuse", *, replicas: int = 1, create: bool = True
    ) -> KVKeyStore:
        """The key store of `prefix` on connection `nc` (the bucket is made when missing)."""
        bucket = bucket_name(prefix)
        js = nc.jetstream()
        try:
            try:
                kv = await js.key_value(bucket)
            except (NotFoundError, KeyNotFoundError):  # nats-py raises either for a missing bucket
                if not create:
                    raise KeyStoreMissingError(
                        store=f"KV bucket {bucket!r}", reason="it does not exist"
                    ) from None
                kv = await js.create_key_value(
                    bucket=bucket,
                    history=1,
                    replicas=replicas,
                    description="newfuse: AES-256 keys per data subject (crypto-shredding)",
                )
        except KeyStoreError:
            raise
        except Exception as error:
            raise KeyStoreUnavailableError(
                store=f"KV bucket {bucket!r}", reason=f"{type(error).__name__}: {error}"
            ) from None
        store = cls(nc, kv, bucket)
        store._listener = await nc.subscribe(f"$KV.{bucket}.>", cb=store._on_update)
        return store

    async def _on_update(self, msg: Msg) -> None:
        subject = _subject_of(msg.subject[len(f"$KV.{self.bucket}.") :])
        changed = self.changed
        if subject is not None and changed is not None:
            changed(subject)

    def generation(self) -> int:
        # asked on every sealed field read: the client's own counter, as it is
        reconnects: int = self.nc.stats.get("reconnects", 0)
        return reconnects

    async def get(self, subject: str) -> SubjectKey | None:
        try:
            entry = await self.kv.get(_kv_key(subject))
        except KeyNotFoundError:  # includes deleted and purged keys
            return None
        except Exception as error:
            raise KeyStoreUnavailableError(
                store=self.name, reason=f"get: {type(error).__name__}: {error}"
            ) from None
        return self._decode(entry.value)

    def _decode(self, value: bytes | None) -> SubjectKey:
        try:
            return _ENTRY.decode(value or b"")
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise KeyStoreError(store=self.name, reason=f"malformed entry: {error}") from None

    async def create(self, subject: str) -> SubjectKey:
        fresh = new_key(check_subject(subject))
        try:
            await self.kv.create(_kv_key(subject), _ENCODE.encode(fresh))
            return fresh
        except KeyWrongLastSequenceError:  # another process made it first: use that one
            pass
        except Exception as error:
            raise KeyStoreUnavailableError(
                store=self.name, reason=f"create: {type(error).__name__}: {error}"
            ) from None
        found = await self.get(subject)
        if found is None:
            raise KeyStoreUnavailableError(
                store=self.name, reason=f"the key of {subject!r:.80} was forgotten while made"
            )
        return found

    async def forget(self, subject: str) -> str | None:
        found = await self.get(subject)
        try:
            await self.kv.purge(_kv_key(subject))
        except Exception as error:
            raise KeyStoreUnavailableError(
                store=self.name, reason=f"purge: {type(error).__name__}: {error}"
            ) from None
        return None if found is None else found.kid

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        unsubscribe = getattr(listener, "unsubscribe", None)
        if unsubscribe is not None and not self.nc.is_closed:
            await unsubscribe()
