"""Settings shared by every service: which Kafka to use and how to reach it.

Each service has its own pydantic-settings class with its own env prefix (``EVHUB_PUBLISHER_`` …) and embeds
:class:`KafkaSettings`. Settings are built once in a ``__main__`` and passed down; nothing else reads the
environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.errors import ConfigurationError, EvidenceHubError
from services.shared.keys import PublicKey
from services.shared.local_kafka import default_cache_dir
from services.shared.tls import CertFiles


class KafkaSettings(BaseSettings):
    """``EVHUB_KAFKA_BOOTSTRAP`` set → that cluster. Otherwise ``EVHUB_KAFKA=testcontainers`` with a Docker engine
    → a container from the ``apache/kafka`` image. Otherwise the local broker from ops/kafka (Maven jars)."""

    model_config = SettingsConfigDict(env_prefix="EVHUB_KAFKA_", extra="ignore")

    bootstrap: str | None = None
    provider: Literal["local", "testcontainers"] = Field(
        default="local", validation_alias=AliasChoices("EVHUB_KAFKA", "provider")
    )
    image: str = "apache/kafka:4.3.1"
    cache_dir: Path = Field(default_factory=default_cache_dir)
    work_root: Path | None = None
    data_dir: Path | None = Field(default=None, description="persistent local broker: its data survives restarts")
    heap_mb: int = Field(default=512, ge=256, le=8192)
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    replication_factor: int = Field(default=1, ge=1, le=7, description="for the hub's topics")
    min_insync_replicas: int = Field(default=1, ge=1, le=7, description="for the hub's topics")


class ServerTLS(BaseModel):
    """Mutual TLS for a service's HTTP listener: the files, or an explicitly unsafe plaintext mode.

    Mixed into each service's settings class (which supplies the env prefix)."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    unsafe_plaintext: bool = Field(default=False, description="serve HTTP without TLS; local experiments only")

    @field_validator("tls_cert", "tls_key", "tls_ca", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``VAR=`` (empty) means not set, never the current directory."""
        return None if isinstance(value, str) and not value.strip() else value

    def tls_files(self) -> CertFiles | None:
        """Raises: ConfigurationError without all three TLS files (naming the missing ones), unless
        ``unsafe_plaintext`` and none is set."""
        given = {"TLS_CERT": self.tls_cert, "TLS_KEY": self.tls_key, "TLS_CA": self.tls_ca}
        if self.tls_cert and self.tls_key and self.tls_ca:
            return CertFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)
        if any(given.values()):
            missing = ", ".join(name for name, path in given.items() if not path)
            raise ConfigurationError(f"TLS is incomplete: the service's {missing} is missing or empty")
        if self.unsafe_plaintext:
            return None
        raise ConfigurationError("TLS is required: set the service's TLS_CERT, TLS_KEY and TLS_CA")


def read_public_keys(paths: list[Path], *, what: str, env: str) -> list[PublicKey]:
    """The Ed25519 public keys in ``paths`` (PEM) — trust anchors, policy-admin keys.

    Raises:
        ConfigurationError: none configured (naming ``env``), or one unreadable, not Ed25519, or weak.
    """
    if not paths:
        raise ConfigurationError(f"no {what} configured ({env})")
    keys = []
    for path in paths:
        try:
            keys.append(PublicKey.from_pem(path.read_bytes()))
        except OSError as exc:
            raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from exc
        except EvidenceHubError as exc:
            raise ConfigurationError(f"{what} {path} refused: {exc.detail}") from exc
    return keys
