"""Settings of the policy service (env prefix ``EVHUB_POLICY_``), built once in ``__main__``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.kafka import POLICY_TOPIC
from services.shared.keys import PublicKey
from services.shared.settings import KafkaSettings, ServerTLS, read_public_keys


class PolicySettings(ServerTLS, BaseSettings):
    """``EVHUB_POLICY_ADMIN_KEYS='["/etc/evhub/policy-admin.pub.pem"]'`` names the trusted policy-admin public
    keys (PEM files). Without at least one, the service refuses to start: it could accept no version at all."""

    model_config = SettingsConfigDict(env_prefix="EVHUB_POLICY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8082, ge=0, le=65535)
    topic: str = POLICY_TOPIC
    admin_keys: list[Path] = Field(default_factory=list)
    #: How much earlier than its hub.policy record a version may say it takes effect (clock skew between hosts).
    max_clock_skew_s: float = Field(default=30.0, ge=0, le=300)
    cache_size: int = Field(default=65_536, ge=0)
    max_body_bytes: int = Field(default=2 << 20, ge=1024)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    @property
    def max_clock_skew(self) -> timedelta:
        return timedelta(seconds=self.max_clock_skew_s)

    def load_admin_keys(self) -> list[PublicKey]:
        """Raises: ConfigurationError if none are configured, or one is unreadable, not Ed25519, or weak."""
        return read_public_keys(self.admin_keys, what="policy-admin key", env="EVHUB_POLICY_ADMIN_KEYS")
