"""TLS between clients and nats-server: a throwaway CA for development and tests, the server's
`tls { ... }` block, and the client context that trusts one CA.

Production brings its own certificates (any CA the deployment runs); `make_certificates` is for
`fuse dev --tls` and tests, which need a server certificate nobody else trusts. The CA's private
key is never written: it signs the one server certificate and is dropped, so the CA file can
vouch for nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from newfuse._files import write_private
from newfuse.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_FILE = "ca.pem"
"""The CA certificate in a directory of `make_certificates`: what clients trust."""
CERT_FILE = "server.pem"
KEY_FILE = "server-key.pem"

_CLOCK_SKEW = timedelta(minutes=5)
"""Certificates are valid from a little before now, so a client whose clock lags accepts them."""


@dataclass(frozen=True, slots=True)
class Certificates:
    """The files of a server's TLS: its certificate and key, and the CA clients verify it with.

    Attributes:
        ca: the CA certificate (PEM) clients trust (`FUSE_NATS_CA`, `--ca`).
        cert: the server's certificate (PEM), signed by that CA.
        key: the server's private key (PEM, owner-only).
    """

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def existing(cls, directory: str | Path) -> Certificates | None:
        """The certificates `make_certificates` wrote in `directory`, or None if any is missing
        (so a `fuse dev --data-dir` keeps its CA across restarts: clients need no new one)."""
        folder = Path(directory)
        found = cls(ca=folder / CA_FILE, cert=folder / CERT_FILE, key=folder / KEY_FILE)
        return found if all(path.is_file() for path in (found.ca, found.cert, found.key)) else None


def make_certificates(
    directory: str | Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    *,
    days: int = 365,
) -> Certificates:
    """Make a throwaway CA and a server certificate it signs for `hosts`, in `directory`.

    Each host becomes a subject alternative name (an IP address or a DNS name), which is what
    a client checks the URL's host against. Keys are P-256 (quick to make, accepted by Go's and
    OpenSSL's TLS); files are written owner-only, key files included, replacing older ones.

    Args:
        directory: where `ca.pem`, `server.pem` and `server-key.pem` go (made if missing).
        hosts: the names and addresses clients reach the server by.
        days: how long the certificates are valid.

    Returns:
        The paths of the three files.

    Raises:
        ConfigError: `hosts` is empty.
    """
    if not hosts:
        raise ConfigError(
            variable="hosts", value=list(hosts), reason="name at least one host or IP address"
        )
    # imported here: every connection imports this module, only dev and tests make certificates
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    start, end = now - _CLOCK_SKEW, now + timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "newfuse throwaway CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(host) for host in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    made = Certificates(ca=folder / CA_FILE, cert=folder / CERT_FILE, key=folder / KEY_FILE)
    write_private(made.key, _pem_key(key))
    write_private(made.cert, server.public_bytes(serialization.Encoding.PEM))
    write_private(made.ca, ca.public_bytes(serialization.Encoding.PEM))
    return made


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates; a server signs its handshakes (ECDHE-ECDSA)."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def server_tls_block(cert_file: str | Path, key_file: str | Path, *, timeout: float = 2.0) -> str:
    """The `tls { ... }` block of nats-server's configuration that makes every client connection
    TLS (the server then says `tls_required` in its INFO and refuses plain clients).

    Args:
        cert_file: the server's certificate (PEM; a chain, the server's first).
        key_file: its private key (PEM).
        timeout: seconds a client has to finish the handshake (nats-server's default is 2).
    """
    # JSON strings are valid nats-server configuration strings: paths with spaces or quotes
    # are written safely
    return (
        "tls {\n"
        f"  cert_file: {json.dumps(str(Path(cert_file).resolve()))}\n"
        f"  key_file: {json.dumps(str(Path(key_file).resolve()))}\n"
        f"  timeout: {timeout:g}\n"
        "}\n"
    )


def client_context(ca_path: str | Path) -> ssl.SSLContext:
    """An SSL context that trusts only the CA in `ca_path` and checks the server's name.

    Only that CA: a server with a certificate of another CA (even one the system trusts) is
    refused, which is what pinning a deployment's own CA means. TLS 1.2 at least, as
    nats-server's own minimum.

    Raises:
        ConfigError: the file is missing, unreadable, or holds no PEM certificate.
    """
    path = Path(ca_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError:  # before OSError: it is one
        raise ConfigError(
            variable="FUSE_NATS_CA",
            value=str(path),
            reason="not a PEM CA certificate (expected -----BEGIN CERTIFICATE-----)",
        ) from None
    except OSError as error:
        raise ConfigError(
            variable="FUSE_NATS_CA",
            value=str(path),
            reason=f"cannot read the CA certificate ({error.strerror or error})",
        ) from None
    return context
