"""Settings of the gateway (env prefix ``EVHUB_GATEWAY_``), built once in ``__main__``."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.gateway.cursor import CursorKeys
from services.shared.errors import ConfigurationError
from services.shared.kafka import AUDIT_TOPIC, DEAD_LETTER_TOPIC, KEYS_TOPIC, POLICY_TOPIC
from services.shared.keys import PublicKey
from services.shared.settings import KafkaSettings, ServerTLS, read_public_keys
from services.shared.tls import CertFiles


class GatewaySettings(ServerTLS, BaseSettings):
    """Offices are identified by their client certificate (mTLS, TLS 1.3, a SAN URI ``urn:evhub:office:<ID>``);
    the gateway has no plaintext mode. Cursor MAC keys: ``EVHUB_GATEWAY_CURSOR_KEYS='{"k2": "<base64url of ≥32
    random bytes>", "k1": "…"}'`` with ``EVHUB_GATEWAY_CURSOR_KEY_ID=k2`` naming the one new cursors use; cursors
    made under a key that is removed are refused (400)."""

    model_config = SettingsConfigDict(env_prefix="EVHUB_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8444, ge=0, le=65535)
    instance: str = Field(default="gateway-1", min_length=1, max_length=100)
    jurisdictions: list[str] = Field(default_factory=lambda: ["DE", "FR", "SE"])
    data_dir: Path = Path("var/gateway")
    content_dir: Path = Path("var/publisher/content")
    trust_anchor_files: list[Path] = Field(default_factory=list)
    policy_admin_keys: list[Path] = Field(default_factory=list)
    cursor_keys: dict[str, SecretStr] = Field(default_factory=dict)
    cursor_key_id: str = ""
    keys_topic: str = KEYS_TOPIC
    policy_topic: str = POLICY_TOPIC
    audit_topic: str = AUDIT_TOPIC
    deadletter_topic: str = DEAD_LETTER_TOPIC
    #: Releases are refused while the view of hub.keys or hub.policy is older than this.
    max_view_age_s: float = Field(default=30.0, gt=0)
    audit_timeout_s: float = Field(default=5.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1)
    tail_records: int = Field(default=4096, ge=16)
    catchup_concurrency: int = Field(default=2, ge=1, le=64)
    max_batch: int = Field(default=500, ge=1, le=4096)
    default_batch: int = Field(default=100, ge=1, le=4096)
    max_wait_s: float = Field(default=30.0, ge=0, le=300)
    sse_send_timeout_s: float = Field(default=30.0, gt=0)
    sse_ping_s: float = Field(default=15.0, gt=0)
    decision_cache: int = Field(default=65_536, ge=0)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    def tls_files(self) -> CertFiles:
        """Raises: ConfigurationError without all three TLS files: the gateway serves mutual TLS only."""
        if self.tls_cert and self.tls_key and self.tls_ca:
            return CertFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)
        raise ConfigurationError("TLS is required: set EVHUB_GATEWAY_TLS_CERT, _TLS_KEY and _TLS_CA (offices are "
                                 "identified by their client certificate)")  # fmt: skip

    def trust_anchors(self) -> list[PublicKey]:
        return read_public_keys(self.trust_anchor_files, what="trust anchor", env="EVHUB_GATEWAY_TRUST_ANCHOR_FILES")

    def admin_keys(self) -> list[PublicKey]:
        return read_public_keys(self.policy_admin_keys, what="policy-admin key", env="EVHUB_GATEWAY_POLICY_ADMIN_KEYS")

    def cursor_key_set(self) -> CursorKeys:
        """Raises: ConfigurationError for no keys, a key that is not base64url of ≥ 32 bytes, or no current id."""
        keys = {}
        for key_id, secret in self.cursor_keys.items():
            text = secret.get_secret_value()
            try:
                keys[key_id] = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            except (binascii.Error, ValueError) as exc:
                raise ConfigurationError(f"cursor key {key_id!r} is not base64url") from exc
        if not keys:
            raise ConfigurationError("no cursor keys (EVHUB_GATEWAY_CURSOR_KEYS, EVHUB_GATEWAY_CURSOR_KEY_ID)")
        return CursorKeys(keys, current=self.cursor_key_id)
