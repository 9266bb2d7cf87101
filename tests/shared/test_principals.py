"""Principals from client certificates: exactly one well-formed ``urn:evhub:<kind>:<name>`` SAN URI, or no one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from services.cli.main import main
from services.shared.errors import Forbidden
from services.shared.principals import principal_from_der, principal_uri
from services.shared.tls import issue_leaf


def _der(directory: Path, name: str, uris: tuple[str, ...]) -> bytes:
    files = issue_leaf(directory, name, uris=uris)
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    ("uris", "expected"),
    [
        (("urn:evhub:office:DE-GBA-WCU",), ("office", "DE-GBA-WCU")),
        (("urn:evhub:auditor:court-1",), ("auditor", "court-1")),
        (("https://example.org/x", "urn:evhub:office:FR-PNAT"), ("office", "FR-PNAT")),
    ],
    ids=["office", "auditor", "other-uris-ignored"],
)
def test_a_certificate_naming_one_principal_names_it(
    tmp_path: Path, uris: tuple[str, ...], expected: tuple[str, str]
) -> None:
    der = _der(tmp_path, "c", uris)
    principal = principal_from_der(der)
    assert (principal.kind, principal.name) == expected
    assert principal.cert_sha256 == hashlib.sha256(der).hexdigest()
    assert principal.uri == f"urn:evhub:{expected[0]}:{expected[1]}"


REFUSED = {
    "no-uri": (),
    "two-principals": ("urn:evhub:office:DE-GBA-WCU", "urn:evhub:office:FR-PNAT"),
    "unknown-kind": ("urn:evhub:admin:root",),
    "malformed-name": ("urn:evhub:office:../../etc",),
    "empty-name": ("urn:evhub:office:",),
    "no-kind-separator": ("urn:evhub:office",),
}


@pytest.mark.parametrize("uris", REFUSED.values(), ids=REFUSED.keys())
def test_a_certificate_naming_no_single_principal_is_refused(tmp_path: Path, uris: tuple[str, ...]) -> None:
    with pytest.raises(Forbidden):
        principal_from_der(_der(tmp_path, "c", uris))


def test_garbage_is_refused() -> None:
    with pytest.raises(Forbidden):
        principal_from_der(b"\x30\x03\x02\x01\x00")


def test_evhub_certs_issue_names_the_office_and_refuses_bad_names(tmp_path: Path) -> None:
    assert main(["certs", "issue", "--dir", str(tmp_path), "--office", "DE-GBA-WCU"]) == 0
    pem = (tmp_path / "office-DE-GBA-WCU.pem").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    assert principal_from_der(der).uri == principal_uri("office", "DE-GBA-WCU")
    assert (tmp_path / "office-DE-GBA-WCU.key").stat().st_mode & 0o077 == 0
    assert main(["certs", "issue", "--dir", str(tmp_path), "--office", "../x"]) == 2
    assert not list(tmp_path.glob("*x*"))
