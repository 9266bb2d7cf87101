"""Settings of the audit service (env prefix ``EVHUB_AUDIT_``), built once in ``__main__``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.audit.note import CosignatureVerifier, NoteSigner, check_name, parse_vkey
from services.shared.errors import ConfigurationError, EvidenceHubError
from services.shared.kafka import AUDIT_TOPIC, DEAD_LETTER_TOPIC
from services.shared.keys import SigningKey
from services.shared.settings import KafkaSettings, ServerTLS


class AuditSettings(ServerTLS, BaseSettings):
    """``EVHUB_AUDIT_SIGNING_KEY`` names the log's Ed25519 private key (PEM); ``EVHUB_AUDIT_ORIGIN`` is the
    checkpoint origin and the key's name (a schema-less URL, no spaces or ``+``)."""

    model_config = SettingsConfigDict(env_prefix="EVHUB_AUDIT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8083, ge=0, le=65535)
    topic: str = AUDIT_TOPIC
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    data_dir: Path = Path("var/audit")
    tiles_dir: Path | None = Field(default=None, description="default: <data_dir>/log")
    index_path: Path | None = Field(default=None, description="default: <data_dir>/index.sqlite3")
    signing_key: Path | None = None
    origin: str = "evidence-hub.example/audit"
    checkpoint_interval_s: float = Field(default=1.0, gt=0, le=3600, description="re-sign when idle this often")
    max_checkpoint_age_s: float = Field(default=5.0, gt=0, description="/readyz fails past this age")
    max_records: int = Field(default=2000, ge=1, le=100_000, description="hub.audit records per integration")
    fetch_max_bytes: int = Field(default=16 << 20, ge=1 << 20)
    page_limit: int = Field(default=1000, ge=1, le=10_000, description="most entries in one query answer")
    witness_keys: list[str] = Field(default_factory=list, description="cosignature/v1 verifier keys (JSON list) of "
                                    "the witnesses whose cosignatures the log accepts and serves")  # fmt: skip
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    @field_validator("origin")
    @classmethod
    def _origin_is_a_key_name(cls, value: str) -> str:
        try:
            return check_name(value)
        except EvidenceHubError as exc:
            raise ValueError(exc.detail) from exc

    @field_validator("witness_keys")
    @classmethod
    def _witness_keys_are_cosigners(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                verifier = parse_vkey(text)
            except EvidenceHubError as exc:
                raise ValueError(f"{text[:60]!r}: {exc.detail}") from exc
            if not isinstance(verifier, CosignatureVerifier):
                raise ValueError(f"{text[:60]!r} is not a cosignature/v1 (type 0x04) verifier key")
        return value

    def witnesses(self) -> list[CosignatureVerifier]:
        """The witnesses whose cosignatures the log accepts (validated at load)."""
        return [v for v in map(parse_vkey, self.witness_keys) if isinstance(v, CosignatureVerifier)]

    @property
    def tiles_root(self) -> Path:
        return self.tiles_dir or self.data_dir / "log"

    @property
    def index_file(self) -> Path:
        return self.index_path or self.data_dir / "index.sqlite3"

    def load_signer(self) -> NoteSigner:
        """Raises: ConfigurationError without a readable Ed25519 private key."""
        if self.signing_key is None:
            raise ConfigurationError("the audit log needs its signing key (EVHUB_AUDIT_SIGNING_KEY, a PEM file)")
        try:
            key = SigningKey.from_pem(self.signing_key.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read the audit signing key {self.signing_key}: {exc.strerror}") from exc
        except EvidenceHubError as exc:
            raise ConfigurationError(f"audit signing key {self.signing_key} refused: {exc.detail}") from exc
        return NoteSigner(self.origin, key)
