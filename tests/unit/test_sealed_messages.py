"""A reader that holds the keys opens the sealed values of an A2A message's payload by their
form (agents/sealing.py `open_held`): plaintext while the key exists, "[redacted]" once
forgotten or without keys, a moved value refused with the field and event named."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from newfuse.agents.sealing import open_held
from newfuse.errors import SealedValueError
from newfuse.schemas import REDACTED, A2AMessage, A2AMetadata
from newfuse.security import SQLiteKeyStore, SubjectCipher

EVENT = "01890a5d-ac96-774b-bcce-b302099a8057"


async def sealed_message(cipher: SubjectCipher, event_id: str = EVENT) -> A2AMessage:
    await cipher.load(["c-1"], create=True)
    email = cipher.encrypt("c-1", b'"alice@example.com"', event_id, "$.payload.email")
    return A2AMessage(
        type="intake",
        payload={
            "customer": "c-1",
            "email": msgspec.to_builtins(email),
            "plan": "pro",
            "looks": {"enc": "A256GCM", "sub": 1, "kid": 2, "iv": 3, "ct": 4},  # not one
        },
        metadata=A2AMetadata(sender="alice/1"),
    )


async def test_open_held_opens_redacts_once_forgotten_and_refuses_a_moved_value(
    tmp_path: Path,
) -> None:
    keys = await SQLiteKeyStore.open(tmp_path / "keys.sqlite")
    cipher = SubjectCipher(keys, owns_keys=True)
    try:
        message = await sealed_message(cipher)
        opened, redacted = await open_held(SubjectCipher(keys), message, EVENT)  # a cold cache
        assert opened.payload["email"] == "alice@example.com" and redacted == ()
        assert opened.payload["looks"] == message.payload["looks"]  # other members as they are
        assert message.payload["email"]["enc"] == "A256GCM"  # the stored message is kept

        keyless, redacted = await open_held(None, message, EVENT)
        assert keyless.payload["email"] == REDACTED and redacted == ("$.payload.email",)
        assert keyless.payload["plan"] == "pro"

        with pytest.raises(SealedValueError, match=r"\$\.payload\.email of event 'other'"):
            await open_held(cipher, message, "other")  # moved into another event
        moved = msgspec.structs.replace(
            message, payload={**message.payload, "note": message.payload["email"]}
        )
        with pytest.raises(SealedValueError, match=r"\$\.payload\.note .* does not authenticate"):
            await open_held(cipher, moved, EVENT)  # copied into another field

        await cipher.forget("c-1")
        forgotten, redacted = await open_held(SubjectCipher(keys), message, EVENT)
        assert forgotten.payload == {**message.payload, "email": REDACTED}
        assert redacted == ("$.payload.email",)

        plain = A2AMessage(type="note", payload={"text": "A256GCM"}, metadata=message.metadata)
        assert await open_held(cipher, plain, EVENT) == (plain, ())
    finally:
        await cipher.close()
