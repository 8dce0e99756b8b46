"""The field cipher: AES-256-GCM per data subject over a key store, with a key cache so that
sealing and opening stay synchronous inside the event store's encode and decode.

The cache holds, per subject, its current key (id and AEAD object); and the (subject, key id)
pairs known to be forgotten, which never come back (key ids are random). A miss raises
KeyNotLoadedError; the store then awaits `fetch` and decodes the event again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from newfuse.config import Settings
from newfuse.errors import (
    KeyNotLoadedError,
    KeyStoreMissingError,
    KeyStoreUnavailableError,
    SealedValueError,
)
from newfuse.eventstore import EventStore
from newfuse.schemas import SealedValue
from newfuse.schemas.sealed import ALGORITHM, associated_data, b64, unb64
from newfuse.security.keys import KeyStore, KVKeyStore, SQLiteKeyStore, SubjectKey

NONCE_BYTES: Final = 12
IV_CHARS: Final = 16
"""Length of a sealed value's `iv`: 12 bytes are 16 base64url characters, never padded."""
CACHE_SUBJECTS: Final = 65_536
"""Subjects whose keys one process keeps in memory (the one cached first is dropped first)."""
KEYS_FILE: Final = "keys.sqlite"
"""The local key store's file in the state directory (stores that are SQLite files)."""


class SubjectCipher:
    """Seals and opens payload fields with the key of their data subject (a FieldCipher).

    Example:
        keys = await SQLiteKeyStore.open("/tmp/keys.sqlite")
        use_keys(store, keys)   # store.append now seals Personal()/Secret() fields
    """

    def __init__(self, keys: KeyStore, *, owns_keys: bool = False) -> None:
        self.keys = keys
        self._owns = owns_keys
        self._current: dict[str, tuple[str, AESGCM]] = {}
        self._gone: dict[tuple[str, str], None] = {}
        self._generation_now = keys.generation
        self._generation = keys.generation()
        keys.changed = self._changed

    def _changed(self, subject: str) -> None:
        self._current.pop(subject, None)  # created or forgotten elsewhere: ask the store again

    def _remember(self, key: SubjectKey) -> None:
        if key.subject not in self._current and len(self._current) >= CACHE_SUBJECTS:
            del self._current[next(iter(self._current))]
        self._current[key.subject] = (key.kid, AESGCM(key.key))

    def _forgotten(self, subject: str, kid: str) -> None:
        if len(self._gone) >= CACHE_SUBJECTS:
            del self._gone[next(iter(self._gone))]
        self._gone[(subject, kid)] = None

    def _check_generation(self) -> None:
        generation = self._generation_now()
        if generation != self._generation:  # notices may have been missed: trust nothing cached
            self._generation = generation
            self._current.clear()

    async def load(self, subjects: Iterable[str], *, create: bool) -> None:
        """Cache the current keys of `subjects`; with `create`, make those that have none."""
        self._check_generation()
        for subject in subjects:
            if subject in self._current:
                continue
            key = await (self.keys.create(subject) if create else self.keys.get(subject))
            if key is not None:
                self._remember(key)

    async def fetch(self, missing: Iterable[tuple[str, str]]) -> None:
        """Ask the key store for each (subject, key id): cache the subject's key, or note the
        id as forgotten when the store no longer holds it."""
        self._check_generation()
        for subject, kid in missing:
            key = await self.keys.get(subject)
            if key is not None:
                self._remember(key)
            if key is None or key.kid != kid:
                self._forgotten(subject, kid)

    def encrypt(self, subject: str, plaintext: bytes, event_id: str, path: str) -> SealedValue:
        entry = self._current.get(subject)
        if entry is None:  # dropped since `load` (forgotten meanwhile): the append may retry
            raise KeyNotLoadedError(subject=subject, kid="(current)")
        kid, aead = entry
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, plaintext, associated_data(event_id, path, subject, kid))
        both = b64(nonce + sealed)  # the nonce's 12 bytes are whole base64 quanta: one call
        return SealedValue(
            enc=ALGORITHM, sub=subject, kid=kid, iv=both[:IV_CHARS], ct=both[IV_CHARS:]
        )

    def decrypt(self, value: SealedValue, event_id: str, path: str) -> bytes | None:
        if self._generation_now() != self._generation:
            self._check_generation()
        entry = self._current.get(value.sub)
        if entry is None or entry[0] != value.kid:
            if (value.sub, value.kid) in self._gone:
                return None
            raise KeyNotLoadedError(subject=value.sub, kid=value.kid)
        iv = value.iv
        try:  # the iv's 16 characters are whole base64 quanta: one call decodes iv and ct
            if len(iv) != IV_CHARS:
                raise ValueError(iv)
            both = unb64(iv + value.ct)
            nonce, sealed = both[:NONCE_BYTES], both[NONCE_BYTES:]
        except ValueError:
            nonce, sealed = _parts(value, event_id, path)
        try:
            return entry[1].decrypt(
                nonce, sealed, associated_data(event_id, path, value.sub, value.kid)
            )
        except InvalidTag:
            raise SealedValueError(
                event_id=event_id,
                path=path,
                reason="it does not authenticate: moved from another event or field, or altered",
            ) from None

    async def forget(self, subject: str) -> str | None:
        """Delete the subject's key from the key store and from this cache; the id of the key
        deleted, None when the store held none."""
        kid = await self.keys.forget(subject)
        self._current.pop(subject, None)
        if kid is not None:
            self._forgotten(subject, kid)
        return kid

    async def close(self) -> None:
        """Close the key store if this cipher owns it. Idempotent."""
        if self._owns:
            await self.keys.close()


def _parts(value: SealedValue, event_id: str, path: str) -> tuple[bytes, bytes]:
    """The nonce and sealed bytes of `value`, decoded one by one (when decoding its iv and ct
    as one failed), or SealedValueError saying which is wrong."""
    try:
        nonce, sealed = unb64(value.iv), unb64(value.ct)
    except ValueError:
        raise SealedValueError(
            event_id=event_id, path=path, reason="its iv or ct is not base64url"
        ) from None
    if len(nonce) != NONCE_BYTES:
        raise SealedValueError(
            event_id=event_id,
            path=path,
            reason=f"its iv is {len(nonce)} bytes long, AES-GCM here uses {NONCE_BYTES}",
        )
    return nonce, sealed


def use_keys(store: EventStore, keys: KeyStore, *, owns_keys: bool = False) -> SubjectCipher:
    """Make `store` seal and open fields with `keys`; with `owns_keys` closing the store
    closes the key store too. Returns the cipher (for `forget`)."""
    cipher = SubjectCipher(keys, owns_keys=owns_keys)
    store.cipher = cipher
    return cipher


async def open_key_store(store: EventStore, settings: Settings, *, create: bool = True) -> KeyStore:
    """The key store that goes with an event store: the KV bucket `<prefix>_keys` on a
    JetStream store's connection (shared by every process; made with as many copies as the
    events' stream has, so it outlives what the log outlives), else the local file
    `<state dir>/keys.sqlite`.

    Raises:
        KeyStoreMissingError: with `create=False`, the bucket is not there.
    """
    nc = getattr(store, "nc", None)
    subjects = getattr(store, "subjects", None)
    if nc is not None and subjects is not None:
        ensure = getattr(store, "ensure_stream", None)
        if ensure is not None:  # its replica count is known once the stream is provisioned
            await ensure()
        replicas = settings.replicas or getattr(store, "replicas", 0) or 1
        # the bucket's stream may be electing a leader (a node lost): ride it out, as the
        # event store does, for the election timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.election_timeout
        pause = 0.1
        while True:
            try:
                return await KVKeyStore.open(nc, subjects.prefix, replicas=replicas, create=create)
            except KeyStoreUnavailableError:
                if loop.time() + pause >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
    return await SQLiteKeyStore.open(Path(settings.state_dir) / KEYS_FILE)


async def with_keys(store: EventStore, settings: Settings, *, create: bool = True) -> EventStore:
    """`store`, sealing and opening fields with its default key store (see `open_key_store`),
    which closes with it. With `create=False` (a command that only reads) a bucket that is not
    there is not made: nothing was sealed with it, and sealed fields read as redacted. On
    failure the store is closed and the error raised."""
    try:
        use_keys(store, await open_key_store(store, settings, create=create), owns_keys=True)
    except KeyStoreMissingError:
        return store
    except BaseException:
        await store.close()
        raise
    return store
