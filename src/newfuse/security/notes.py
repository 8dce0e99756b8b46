"""Signed notes (C2SP signed-note) with Ed25519 keys, and the key files they are signed with.

A note is UTF-8 text ending in a newline, then a blank line, then one signature line per
signer: `— <key name> <base64(key id || signature)>` (an em dash, U+2014). For Ed25519 the key
id is the first 4 bytes of SHA-256(name || 0x0A || 0x01 || public key), and the signature is
over the text before the blank line. A verifier ignores signatures by keys it does not know and
rejects a note that no key it knows signed, so anyone can check a checkpoint with the public
key alone, in any language that has Ed25519.

A private key file holds the key name and the 32-byte seed (base64) on one line,
`newfuse-signing-key <name> <base64 seed>`, and is written with owner-only permissions; a
public key file holds `<name>+<key id hex>+<base64(0x01 || public key)>` (the verifier-key form
of the Go `note` package).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from newfuse.errors import KeyFileError, SignedNoteError

DASH: Final[str] = "\u2014"
ED25519: Final[int] = 0x01
PRIVATE_TAG: Final[str] = "newfuse-signing-key"
MAX_NOTE_BYTES: Final[int] = 16 * 1024
"""The longest note read: a checkpoint note is a few hundred bytes."""


def _check_name(name: str) -> str:
    if not name or len(name) > 128 or any(c.isspace() or c == "+" for c in name):
        raise KeyFileError(
            path="", reason=f"key name {name!r} must be 1-128 characters, no spaces and no '+'"
        )
    return name


def key_id(name: str, public: bytes) -> bytes:
    """The 4-byte id of an Ed25519 key named `name` (C2SP signed-note)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public).digest()[:4]


@dataclass(frozen=True)
class VerifierKey:
    """A public key that checks signatures, and its name."""

    name: str
    public: bytes

    @property
    def id(self) -> bytes:
        return key_id(self.name, self.public)

    def encode(self) -> str:
        """`<name>+<key id hex>+<base64(0x01 || public key)>`."""
        blob = base64.b64encode(bytes([ED25519]) + self.public).decode()
        return f"{self.name}+{self.id.hex()}+{blob}"

    @classmethod
    def decode(cls, text: str, where: str = "a verifier key") -> VerifierKey:
        """Parse the `encode()` form (raises KeyFileError naming `where` and what is wrong)."""
        parts = text.strip().split("+", 2)  # base64 may hold "+" itself
        if len(parts) != 3:
            raise KeyFileError(path=where, reason="expected <name>+<key id hex>+<base64 key>")
        name, hex_id, blob = parts
        try:
            raw = base64.b64decode(blob, validate=True)
        except binascii.Error:
            raise KeyFileError(path=where, reason="the key is not base64") from None
        if len(raw) != 33 or raw[0] != ED25519:
            raise KeyFileError(path=where, reason="not an Ed25519 key (0x01 + 32 bytes)")
        key = cls(_check_name(name), raw[1:])
        if key.id.hex() != hex_id.lower():
            raise KeyFileError(path=where, reason=f"key id {hex_id} does not match the key")
        return key


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key and its name."""

    name: str
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        return cls(_check_name(name), Ed25519PrivateKey.generate())

    @property
    def verifier(self) -> VerifierKey:
        public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return VerifierKey(self.name, public)

    def sign(self, text: str) -> str:
        """`text` (ending in a newline) as a signed note."""
        if not text.endswith("\n"):
            raise SignedNoteError(reason="a note's text must end in a newline")
        signature = self.private.sign(text.encode())
        blob = base64.b64encode(self.verifier.id + signature).decode()
        return f"{text}\n{DASH} {self.name} {blob}\n"

    def save(self, path: Path) -> None:
        """Write the key to `path`, readable by its owner only (refuses to overwrite)."""
        seed = self.private.private_bytes_raw()
        line = f"{PRIVATE_TAG} {self.name} {base64.b64encode(seed).decode()}\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(
                path=str(path), reason="it exists already (remove it first to replace the key)"
            ) from None
        with os.fdopen(fd, "w") as out:
            out.write(line)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a key `save` wrote; refuses one that others may read."""
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as error:
            raise KeyFileError(path=str(path), reason=error.strerror or str(error)) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                path=str(path),
                reason=f"it is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it",
            )
        parts = text.split()
        if len(parts) != 3 or parts[0] != PRIVATE_TAG:
            raise KeyFileError(path=str(path), reason=f"not a {PRIVATE_TAG} file")
        try:
            seed = base64.b64decode(parts[2], validate=True)
            private = Ed25519PrivateKey.from_private_bytes(seed)
        except (binascii.Error, ValueError):
            raise KeyFileError(
                path=str(path), reason="the seed is not 32 bytes of base64"
            ) from None
        return cls(_check_name(parts[1]), private)


@dataclass(frozen=True)
class Verified:
    """A note's text and the known key that signed it."""

    text: str
    key: VerifierKey


def open_note(note: str, keys: list[VerifierKey]) -> Verified:
    """The text of `note` once a key of `keys` checks its signature.

    Raises:
        SignedNoteError: malformed, or signed by no key of `keys` (the reason says which).
    """
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise SignedNoteError(reason=f"a note longer than {MAX_NOTE_BYTES} bytes")
    text, sep, signatures = note.rpartition("\n\n")
    if not sep or not signatures.endswith("\n"):
        raise SignedNoteError(reason="no signature block (a blank line, then signature lines)")
    text += "\n"
    by_id = {(key.name, key.id): key for key in keys}
    names = []
    for line in signatures[:-1].split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH:
            raise SignedNoteError(reason=f"malformed signature line {line[:80]!r}")
        _, name, blob = parts
        try:
            raw = base64.b64decode(blob, validate=True)
        except binascii.Error:
            raise SignedNoteError(reason=f"signature of {name!r} is not base64") from None
        names.append(name)
        key = by_id.get((name, raw[:4]))
        if key is None or len(raw) != 68:
            continue  # a key we do not know: ignored, as the format says
        try:
            Ed25519PublicKey.from_public_bytes(key.public).verify(raw[4:], text.encode())
        except InvalidSignature:
            raise SignedNoteError(reason=f"the signature of {name!r} does not verify") from None
        return Verified(text, key)
    raise SignedNoteError(reason=f"signed by no known key (signers: {', '.join(names)})")
