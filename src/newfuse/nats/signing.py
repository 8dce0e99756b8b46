"""Who sent a message: each identity signs what it publishes, a reader checks it.

nats-server makes sure an identity publishes only where its permissions allow, but many
identities may write one subject (an agent's inbox), and the server does not say who wrote a
message. So a connection with `Credentials` puts two headers on each message it publishes:

- `Fuse-Identity`: its certificate, `<base64url JSON {"name", "role", "key", "agent", "groups"}>.
  <base64url Ed25519 signature of that JSON by an admin's nkey>` (`fuse auth add` issues it);
- `Fuse-Signature`: base64url of the Ed25519 signature, by its own nkey, of
  `<subject> 0x0A <body>`.

A reader that trusts an admin key (`Trust`) checks both and learns the sender's identity, which
the runtime then compares with the message's `metadata.sender`. Any language with Ed25519 can
check the same; the keys are nkeys (base32 of the 32-byte Ed25519 key, with a prefix and CRC).
The JetStream event store checks the events it reads the same way (`RecordedEvent.signer`), so
a fold can count only what the identity it names signed (core/review.py).
"""

from __future__ import annotations

import base64
import binascii
import weakref
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from nats.aio.client import Client

from newfuse.schemas import Certified as Certified  # re-exported: the claims of a certificate

IDENTITY: Final[str] = "Fuse-Identity"
SIGNATURE: Final[str] = "Fuse-Signature"
MAX_CERTIFICATE: Final[int] = 2048


def _nkeys() -> Any:
    import nkeys  # type: ignore[import-untyped]  # nats-io's nkey library

    return nkeys


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SenderError(Exception):
    """A message's identity headers are missing, malformed, or do not verify (the reason)."""


def issue(admin_seed: str, holder: Certified) -> str:
    """A certificate for `holder`, signed by the admin whose seed is `admin_seed`."""
    body = msgspec.json.encode(holder)
    pair = _nkeys().from_seed(bytearray(admin_seed.encode()))
    try:
        return f"{_b64(body)}.{_b64(pair.sign(body))}"
    finally:
        pair.wipe()


class Signer:
    """Signs what one identity publishes (its seed held in memory while it is connected)."""

    def __init__(self, seed: str, certificate: str) -> None:
        self._pair = _nkeys().from_seed(bytearray(seed.encode()))
        self.certificate = certificate

    @property
    def holder(self) -> Certified:
        """What its certificate says (not checked here: it is our own)."""
        return _claims(self.certificate)

    def headers(self, subject: str, body: bytes) -> dict[str, str]:
        signature = self._pair.sign(subject.encode() + b"\n" + body)
        return {IDENTITY: self.certificate, SIGNATURE: _b64(signature)}


_signers: weakref.WeakKeyDictionary[Client, Signer] = weakref.WeakKeyDictionary()


def sign_on(nc: Client, signer: Signer) -> None:
    """Make `nc`'s publishes through newfuse carry `signer`'s headers."""
    _signers[nc] = signer


def identity_of(nc: Client) -> Certified | None:
    """Who `nc` signs as (None: it signs nothing)."""
    signer = _signers.get(nc)
    return None if signer is None else signer.holder


def signed(nc: Client, subject: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
    """`headers` with `nc`'s identity headers added (as they are, for an anonymous `nc`)."""
    signer = _signers.get(nc)
    return headers if signer is None else {**headers, **signer.headers(subject, body)}


class Trust:
    """The admin keys whose certificates a reader accepts (`U…` public nkeys). Certificates
    checked once are remembered (up to `CACHED` of them), so a message costs one signature
    check (libsodium's: about 150 µs here, where OpenSSL's took 360 µs; an event store checks
    every signed event it reads)."""

    CACHED: Final[int] = 1024

    def __init__(self, admins: tuple[str, ...]) -> None:
        self.admins = admins
        self._known: dict[str, tuple[Certified, VerifyKey]] = {}

    def sender(self, subject: str, body: bytes, headers: dict[str, str] | None) -> Certified:
        """Who signed this message.

        Raises:
            SenderError: unsigned, a certificate no trusted admin issued, or a signature that
                does not match the subject and body (the reason says which).
        """
        found = headers or {}
        certificate, signature = found.get(IDENTITY), found.get(SIGNATURE)
        if not certificate or not signature:
            raise SenderError("the message is not signed (no Fuse-Identity / Fuse-Signature)")
        holder, key = self._known.get(certificate) or self._check(certificate)
        try:
            key.verify(subject.encode() + b"\n" + body, _unb64(signature))
        except (binascii.Error, ValueError, TypeError, BadSignatureError):
            raise SenderError(
                f"the signature is not {holder.name!r}'s, or the message changed"
            ) from None
        return holder

    def _check(self, certificate: str) -> tuple[Certified, VerifyKey]:
        if len(certificate) > MAX_CERTIFICATE or certificate.count(".") != 1:
            raise SenderError("Fuse-Identity is not a certificate")
        body_part, by_part = certificate.split(".")
        try:
            claims, by = _unb64(body_part), _unb64(by_part)
            holder = msgspec.json.decode(claims, type=Certified)
            key = VerifyKey(public_key_bytes(holder.key))
        except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
            raise SenderError("Fuse-Identity is malformed") from None
        if not any(_verifies(admin, claims, by) for admin in self.admins):
            raise SenderError(f"the certificate of {holder.name!r} was issued by no trusted admin")
        if len(self._known) >= self.CACHED:
            del self._known[next(iter(self._known))]
        self._known[certificate] = (holder, key)
        return holder, key


def _claims(certificate: str) -> Certified:
    """The claims of a certificate, unchecked (for one's own: `Trust.sender` checks others')."""
    return msgspec.json.decode(_unb64(certificate.partition(".")[0]), type=Certified)


def public_key_bytes(public: str) -> bytes:
    """The 32-byte Ed25519 key of a user public nkey (`U…`: base32 of the prefix byte, the key
    and a CRC-16 little-endian).

    Raises:
        ValueError: not a user public nkey, or its checksum is wrong.
    """
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError):
        raise ValueError("not base32") from None
    if len(raw) != 35 or raw[0] != _nkeys().PREFIX_BYTE_USER:
        raise ValueError("not a user public nkey")
    if int.from_bytes(raw[33:], "little") != _nkeys().crc16(bytearray(raw[:33])):
        raise ValueError("its checksum is wrong")
    return raw[1:33]


def _verifies(public: str, data: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key_bytes(public)).verify(signature, data)
    except (ValueError, InvalidSignature):
        return False
    return True


_trusts: weakref.WeakKeyDictionary[Client, Trust] = weakref.WeakKeyDictionary()


def trust_on(nc: Client, trust: Trust) -> None:
    """What readers on `nc` check senders against."""
    _trusts[nc] = trust


def trust_of(nc: Client) -> Trust | None:
    """The trust readers on `nc` check senders against (None: senders are not checked)."""
    return _trusts.get(nc)
