"""Who a client certificate names: the hub's principals, carried as a SAN URI.

An office's certificate carries ``urn:evhub:office:<OFFICE_ID>`` (e.g. ``urn:evhub:office:DE-GBA-WCU``), an
auditor's ``urn:evhub:auditor:<NAME>``. Exactly one such URI per certificate: a certificate naming two principals,
none, another kind, or a malformed id names no one. The TLS layer has already checked the chain (our CA only),
the validity period and the key; this module only reads the name, from the certificate's DER bytes, and the
certificate's SHA-256 (what audit records name).

Pure: no I/O, no clock. Does not own: whether the principal may do anything (the policy), TLS contexts (``tls``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final, Literal

from cryptography import x509

from services.shared.errors import Forbidden

URN_PREFIX: Final = "urn:evhub:"
Kind = Literal["office", "auditor"]
KINDS: Final[tuple[Kind, ...]] = ("office", "auditor")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # the policy model's office id


@dataclass(frozen=True)
class Principal:
    kind: Kind
    name: str
    #: SHA-256 (lower-case hex) of the client certificate's DER encoding.
    cert_sha256: str

    @property
    def uri(self) -> str:
        return principal_uri(self.kind, self.name)


def principal_uri(kind: Kind, name: str) -> str:
    """``("office", "DE-GBA-WCU")`` → ``urn:evhub:office:DE-GBA-WCU``.

    Raises:
        ValueError: an unknown kind or a name that is not an identifier (a bug in the caller).
    """
    if kind not in KINDS or not _NAME.fullmatch(name):
        raise ValueError(f"not a principal: {kind}:{name}")
    return f"{URN_PREFIX}{kind}:{name}"


def parse_uri(uri: str) -> tuple[Kind, str] | None:
    """``urn:evhub:office:DE-GBA-WCU`` → ``("office", "DE-GBA-WCU")``; None for anything else."""
    if not uri.startswith(URN_PREFIX):
        return None
    kind, sep, name = uri[len(URN_PREFIX) :].partition(":")
    if not sep or not _NAME.fullmatch(name):
        return None
    for known in KINDS:
        if kind == known:
            return known, name
    return None


def principal_from_der(der: bytes) -> Principal:
    """The principal a verified client certificate names.

    Raises:
        Forbidden: the certificate does not parse, or does not name exactly one well-formed hub principal.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = x509.SubjectAlternativeName([])
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URN_PREFIX)]
    except ValueError as exc:
        raise Forbidden("the client certificate could not be read") from exc
    if len(uris) != 1:
        raise Forbidden("the client certificate does not name exactly one hub principal (urn:evhub:…)")
    parsed = parse_uri(uris[0])
    if parsed is None:
        raise Forbidden("the client certificate names no known kind of hub principal")
    return Principal(kind=parsed[0], name=parsed[1], cert_sha256=hashlib.sha256(der).hexdigest())
