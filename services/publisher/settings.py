"""Settings of the publisher service (env prefix ``EVHUB_PUBLISHER_``), built once in ``__main__``."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.errors import ConfigurationError, EvidenceHubError
from services.shared.keys import PublicKey, SigningKey
from services.shared.settings import KafkaSettings, ServerTLS, read_public_keys
from services.shared.tls import CertFiles


class PublisherSettings(ServerTLS, BaseSettings):
    """The organisation the events name is the one ``hub.keys`` registered the signing key for: it is read from
    the registry at start, never configured twice.

    Documentation-group clients authenticate with client certificates (mTLS): the key never leaves their
    machine, nothing bearer-like can be replayed from a log, and the same PKI already protects hub ↔ broker
    traffic. Only certificate CNs in ``allowed_clients`` may publish."""

    model_config = SettingsConfigDict(env_prefix="EVHUB_PUBLISHER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    data_dir: Path = Path("var/publisher")
    signing_key_file: Path | None = None
    trust_anchor_files: list[Path] = Field(default_factory=list)
    jurisdictions: list[str] = Field(default_factory=lambda: ["DE", "FR", "SE"])
    max_file_bytes: int = Field(default=16 << 30, ge=1)
    max_metadata_bytes: int = Field(default=256 << 10, ge=1024, le=1 << 20)
    allowed_clients: list[str] = Field(default_factory=list)
    relay_interval_s: float = Field(default=5.0, gt=0)
    #: A request waits at most this long for Kafka's acknowledgement, then gets a 503 naming what is missing.
    delivery_timeout_s: float = Field(default=10.0, gt=0, le=600)
    #: Kafka aborts a transaction this publisher left open (crashed, stopped) after this long; readers of the
    #: topic wait for it meanwhile, so keep it short. Larger than a round ever takes.
    transaction_timeout_s: float = Field(default=30.0, ge=1, le=900)
    #: At start: how long Kafka may take to answer, and to read each topic back (see docs/reliability.md).
    startup_timeout_s: float = Field(default=120.0, gt=0)
    #: On SIGTERM: requests in progress and deliveries in flight get this long, then the process exits.
    shutdown_grace_s: float = Field(default=10.0, gt=0, le=300)
    #: How long a request may wait for the SQLite state while another process holds its write lock.
    store_timeout_s: float = Field(default=10.0, gt=0)
    #: An upload that sends no bytes for this long is refused (408); at most this many uploads per client at once.
    body_idle_timeout_s: float = Field(default=60.0, gt=0)
    max_uploads_per_client: int = Field(default=32, ge=1)
    #: A batch request (``POST /v1/evidence/batch``): at most this many items, their files this many bytes in all.
    max_batch_items: int = Field(default=64, ge=1, le=1000)
    max_batch_bytes: int = Field(default=64 << 20, ge=1)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    def tls_files(self) -> CertFiles | None:
        """Raises: ConfigurationError without TLS files (unless ``unsafe_plaintext`` on a loopback address) or
        without allowed clients."""
        files = super().tls_files()
        if files is not None and not self.allowed_clients:
            raise ConfigurationError("no client CNs allowed to publish (EVHUB_PUBLISHER_ALLOWED_CLIENTS)")
        if files is None and not _loopback(self.host):
            raise ConfigurationError(
                f"EVHUB_PUBLISHER_UNSAFE_PLAINTEXT accepts anonymous uploads: refused on {self.host}, allowed only on "
                "a loopback address (127.0.0.1, ::1, localhost)"
            )
        return files

    def signing_key(self) -> SigningKey:
        """Raises: ConfigurationError if the key file is missing or not an Ed25519 private key."""
        if self.signing_key_file is None:
            raise ConfigurationError("no signing key configured (EVHUB_PUBLISHER_SIGNING_KEY_FILE)")
        try:
            return SigningKey.from_pem(self.signing_key_file.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read signing key {self.signing_key_file}: {exc.strerror}") from exc
        except EvidenceHubError as exc:
            raise ConfigurationError(f"signing key {self.signing_key_file} refused: {exc.detail}") from exc

    def trust_anchors(self) -> list[PublicKey]:
        """Raises: ConfigurationError if none are configured or one is unreadable or weak."""
        return read_public_keys(
            self.trust_anchor_files, what="key-registry trust anchor", env="EVHUB_PUBLISHER_TRUST_ANCHOR_FILES"
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
