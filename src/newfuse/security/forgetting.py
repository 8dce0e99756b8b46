"""Forgetting a data subject: delete its key, then record who did it (a `key.forgotten` event
on `security.keys`), so every field sealed with the key reads as redacted from then on."""

from __future__ import annotations

import msgspec

from newfuse.errors import SealingUnavailableError
from newfuse.eventstore import AppendResult, EventStore
from newfuse.schemas import KEY_FORGOTTEN, KEYS_STREAM, KeyForgotten, NewEvent
from newfuse.security.crypto import SubjectCipher
from newfuse.security.keys import check_subject


class Forgotten(msgspec.Struct, frozen=True, kw_only=True):
    """What `forget` did: the audit event written, and the key id deleted (None when the key
    store held none: forgotten before, or never sealed anything)."""

    event: KeyForgotten
    result: AppendResult


async def forget(
    store: EventStore, subject: str, *, by: str, reason: str | None = None
) -> Forgotten:
    """Delete `subject`'s key from the store's key store and append `key.forgotten`.

    The key goes first: if the append then fails, the subject is forgotten but not recorded,
    and calling again (no key left, `kid` None) records it. The event never holds the key.

    Raises:
        SealingUnavailableError: the store has no key store (see `use_keys`).
        KeyStoreError: the key store refused or did not answer.
    """
    cipher = store.cipher
    if not isinstance(cipher, SubjectCipher):
        raise SealingUnavailableError(stream=KEYS_STREAM, type_name=KEY_FORGOTTEN, fields=[])
    kid = await cipher.forget(check_subject(subject))
    event = KeyForgotten(subject=subject, kid=kid, by=by, reason=reason)
    result = await store.append(KEYS_STREAM, NewEvent(data=event, metadata={"sender": by}))
    return Forgotten(event=event, result=result)
