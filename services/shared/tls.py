"""Mutual TLS: TLS contexts for servers and clients, and a development certificate authority.

Owns: how every hub service builds its ``ssl.SSLContext`` (TLS ≥ 1.2, a client certificate required by servers,
hostname checks by clients) and :func:`create_dev_pki`, which mints a throw-away CA and leaf certificates for
``make demo`` and the tests. Development keys are generated when needed, never committed: a fresh clone has none.
Production certificates come from the operator's own PKI; only the file paths are configured.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.shared.errors import ConfigurationError


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path

    @property
    def bundle(self) -> Path:
        """Private key followed by the certificate chain in one PEM file (Kafka's ``ssl.keystore.type=PEM``)."""
        return self.cert.with_suffix(".bundle.pem")


def server_context(
    files: CertFiles, *, require_client_cert: bool = True, minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
) -> ssl.SSLContext:
    """Raises: ConfigurationError naming the file that can't be read or is not PEM of the right kind."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the client CA {files.ca}: {exc}") from exc
    ctx.minimum_version = minimum_version
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the server certificate {files.cert} with key {files.key}: "
                                 f"{exc}") from exc  # fmt: skip
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(files: CertFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    path.chmod(0o600)


def _load_or_create_ca(
    directory: Path, org: str, days: int, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        return ca_key, x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name(f"{org} CA", org)).issuer_name(_name(f"{org} CA", org))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    _write_key(ca_key_path, ca_key)
    ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return ca_key, ca_cert


def issue_leaf(
    directory: Path, name: str, *, uris: tuple[str, ...] = (), org: str = "Evidence Hub dev", days: int = 30,
    not_before: dt.datetime | None = None, replace: bool = False,
) -> CertFiles:  # fmt: skip
    """A leaf certificate ``<directory>/<name>.pem`` (+ ``.key``, ``.bundle.pem``) from the development CA in
    ``directory`` (created if missing): CN = name; SANs localhost, 127.0.0.1 and ``uris`` (a hub principal such as
    ``urn:evhub:office:DE-GBA-WCU``, see ``principals``); server and client auth. An existing leaf is kept unless
    ``replace``. ``not_before`` (default: five minutes ago) lets tests mint certificates that already expired.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key, ca_cert = _load_or_create_ca(directory, org, days, now)
    files = CertFiles(cert=directory / f"{name}.pem", key=directory / f"{name}.key", ca=directory / "ca.pem")
    if files.cert.exists() and files.key.exists() and not replace:
        return files
    start = not_before or now
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    cert = (
        x509.CertificateBuilder().subject_name(_name(name, org)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    files.key.unlink(missing_ok=True)
    _write_key(files.key, key)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    files.cert.write_bytes(pem + ca_cert.public_bytes(serialization.Encoding.PEM))
    files.bundle.write_bytes(files.key.read_bytes() + pem + ca_cert.public_bytes(serialization.Encoding.PEM))
    files.bundle.chmod(0o600)
    return files


def create_dev_pki(
    directory: Path, names: list[str], *, org: str = "Evidence Hub dev", days: int = 30
) -> dict[str, CertFiles]:
    """A CA plus one leaf per name (see :func:`issue_leaf`), in ``directory``.

    Existing files are reused, so services and clients started later find the same CA.
    """
    return {name: issue_leaf(directory, name, org=org, days=days) for name in names}
