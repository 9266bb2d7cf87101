"""An office's receipt proofs: a receipt turned into a ``c2sp.org/tlog-proof@v1`` that verifies offline.

Owns: checking a proof against the log's verifier key (the user's, never the server's), an optional witness quorum
and the receipt it must prove (:func:`check_proof`, used by ``evhub audit prove`` and ``verify-proof``), and
:class:`AuditProver`, the :class:`~services.cli.subscribe_cmd.ReceiptProver` ``evhub subscribe --log-key`` uses to
keep each receipt's proof beside the items. Does not own: the HTTP client (``audit_client``) or the proof format
(``services.audit.checkpoint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.audit.checkpoint import TlogProof, VerifiedCheckpoint, verify_tlog_proof
from services.audit.note import CosignatureVerifier, Ed25519Verifier, Verifier, parse_vkey
from services.cli.audit_client import HttpLogSource
from services.shared import audit_records
from services.shared.avro import AvroCodec
from services.shared.errors import ConfigurationError, DecodeError, NotFound, PayloadTooLarge, UntrustedKey


def read_vkey(text: str, what: str) -> Ed25519Verifier | CosignatureVerifier:
    """A verifier key given as text, or as ``@FILE`` holding it.

    Raises: ConfigurationError for an unreadable file, UntrustedKey for a malformed key."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {text[1:]}: {exc.strerror}") from exc
    try:
        return parse_vkey(text)
    except UntrustedKey as exc:
        raise UntrustedKey(f"{what}: {exc.detail}") from exc


def log_verifier(text: str, what: str = "--log-key") -> Verifier:
    """The log's own Ed25519 verifier key (never a witness's), from the user, never from the server.

    Raises: ConfigurationError, UntrustedKey (see :func:`read_vkey`; also a witness's key given as the log's)."""
    verifier = read_vkey(text, what)
    if not isinstance(verifier, Ed25519Verifier):
        raise UntrustedKey(f"{what} must be the log's Ed25519 verifier key (type 0x01), not a witness's")
    return verifier


def check_proof(data: bytes, log_key: Verifier, witnesses: list[Verifier], quorum: int,
                receipt: str | None) -> tuple[dict[str, Any], VerifiedCheckpoint]:  # fmt: skip
    """The proven audit entry and the checkpoint it is under, once the proof verifies.

    Raises:
        DecodeError: not a proof, or it carries no audit entry.
        TrustError: the checkpoint's signature, the witness quorum, the inclusion proof, or the proof is for another
            receipt than ``receipt``.
    """
    proof = TlogProof.parse(data)
    if proof.extra is None:
        raise DecodeError("the proof carries no entry (its 'extra' line): nothing to verify it against")
    verified = verify_tlog_proof(data, entry=proof.extra, log=log_key, witnesses=witnesses, quorum=quorum)
    try:
        entry = audit_records.decode_entry(AvroCodec.load(), proof.extra)
    except (DecodeError, PayloadTooLarge) as exc:
        raise DecodeError(f"the proven entry is not an audit entry: {exc.detail}") from exc
    if receipt is not None and entry["entry_id"] != receipt:
        raise UntrustedKey(f"the proof is for entry {entry['entry_id']}, not receipt {receipt}")
    return entry, verified


class AuditProver:
    """Asks the audit service for a receipt's proof and keeps it only once it verifies with the office's copy of the
    log key; a receipt no checkpoint covers yet is None (asked again on the next run)."""

    def __init__(self, *, source: HttpLogSource, log_key: Verifier) -> None:
        self._source = source
        self._log_key = log_key

    async def prove(self, receipt: str) -> bytes | None:
        """Raises: TrustError / DecodeError for a proof that does not verify (the audit service is not believed);
        InfrastructureError when it cannot be reached."""
        try:
            data = await self._source.receipt(receipt)
        except NotFound:
            return None
        check_proof(data, self._log_key, [], 0, receipt)
        return data
