"""Where ``evhub`` finds the hub and its client certificate (env prefix ``EVHUB_CLIENT_``; flags override)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.errors import ConfigurationError
from services.shared.tls import CertFiles


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVHUB_CLIENT_", extra="ignore")

    url: str = "https://127.0.0.1:8443"
    #: ``evhub audit``: the audit service, and where what an auditor or witness verified is remembered.
    audit_url: str = "https://127.0.0.1:8083"
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "state" / "evhub")
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    #: ``evhub subscribe``: the gateway, and the publisher trust anchors (PEM public keys) the office trusts.
    gateway_url: str = "https://127.0.0.1:8444"
    trust_anchor_files: list[Path] = []

    def cert_files(self) -> CertFiles:
        """Raises: ConfigurationError unless certificate, key and CA are all given and readable."""
        if not (self.cert and self.key and self.ca):
            raise ConfigurationError("a client certificate is needed: --cert, --key and --ca (or EVHUB_CLIENT_*)")
        for path in (self.cert, self.key, self.ca):
            if not path.is_file():
                raise ConfigurationError(f"no such file: {path}")
        return CertFiles(cert=self.cert, key=self.key, ca=self.ca)
