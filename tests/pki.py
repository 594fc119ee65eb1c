"""Throwaway PKI for TLS tests: a trusted CA, a rogue CA, server and client certificates.

Imported by tests as ``import pki`` (pytest puts ``tests/`` on ``sys.path``). EC P-256 keys keep
generation to milliseconds; certificates are valid for one day (the expired one ended yesterday).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str, now: dt.datetime):
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(common_name, ca_key, ca_cert, *, server: bool, not_before, not_after):
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(directory: Path, stem: str, key, cert) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def make_pki(directory: str | Path) -> dict[str, Path]:
    """Writes PEM files for a test PKI into ``directory``.

    Returns:
        Paths keyed ``ca``, ``server_cert``/``server_key`` (SAN ``localhost`` and ``127.0.0.1``),
        ``client_cert``/``client_key`` (signed by ``ca``), ``rogue_ca``,
        ``rogue_client_cert``/``rogue_client_key`` (signed by ``rogue_ca``) and
        ``expired_server_cert``/``expired_server_key`` (signed by ``ca``, validity ended).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid = {"not_before": now - dt.timedelta(hours=1), "not_after": now + dt.timedelta(days=1)}
    expired = {"not_before": now - dt.timedelta(days=2), "not_after": now - dt.timedelta(days=1)}

    ca_key, ca_cert = _ca("relay test CA", now)
    rogue_key, rogue_cert = _ca("rogue test CA", now)
    paths: dict[str, Path] = {}
    paths["ca"], _ = _write(directory, "ca", ca_key, ca_cert)
    paths["rogue_ca"], _ = _write(directory, "rogue_ca", rogue_key, rogue_cert)
    leaves = {
        "server": ("localhost", ca_key, ca_cert, True, valid),
        "client": ("relay test client", ca_key, ca_cert, False, valid),
        "rogue_client": ("rogue test client", rogue_key, rogue_cert, False, valid),
        "expired_server": ("localhost", ca_key, ca_cert, True, expired),
    }
    for stem, (cn, issuer_key, issuer_cert, server, validity) in leaves.items():
        key, cert = _leaf(cn, issuer_key, issuer_cert, server=server, **validity)
        paths[f"{stem}_cert"], paths[f"{stem}_key"] = _write(directory, stem, key, cert)
    return paths
