"""Test certificates: a CA made on the spot and server certificates it signs."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerCert:
    ca: Path  # the CA's certificate (PEM), as clients are given it
    cert: Path  # the server's certificate chain (PEM)
    key: Path  # its private key (PEM)

    @property
    def flags(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             now: dt.datetime) -> x509.CertificateBuilder:
    """A certificate of `key` for `subject`, signed by `issuer`, valid from a day ago for a
    month."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
    )


def _write(ca_path: Path, cert_path: Path, key_path: Path, ca_cert: x509.Certificate,
           cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """The CA's and the certificate's PEM, and the key's (PKCS #8, readable by its owner)."""
    pem = serialization.Encoding.PEM
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)


def make_server_cert(directory: Path, names: tuple[str, ...] = ("localhost", "mirror.test"),
                     ips: tuple[str, ...] = ("127.0.0.1",), label: str = "test") -> ServerCert:
    """A fresh CA and a server certificate for `names` and `ips`, written to `directory`
    as ca.crt, server.crt and server.key."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        _builder(_name(f"mirror {label} CA"), _name(f"mirror {label} CA"), ca_key, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        _builder(_name(names[0]), ca_cert.subject, key, now)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = ServerCert(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    _write(paths.ca, paths.cert, paths.key, ca_cert, cert, key)
    return paths


def fingerprint(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256())


@dataclass(frozen=True)
class ClientCert:
    ca: Path  # the CA a server checks client certificates with (PEM)
    cert: Path  # the client's certificate (PEM)
    key: Path  # its private key (PEM)


def make_client_cert(directory: Path, name: str = "mirror", label: str = "client"
                     ) -> ClientCert:
    """A fresh CA and a client certificate (clientAuth) it signs, written to `directory`
    as client-ca.crt, client.crt and client.key."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        _builder(_name(f"mirror {label} CA"), _name(f"mirror {label} CA"), ca_key, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(name), ca_cert.subject, key, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = ClientCert(directory / "client-ca.crt", directory / "client.crt",
                       directory / "client.key")
    _write(paths.ca, paths.cert, paths.key, ca_cert, cert, key)
    return paths
