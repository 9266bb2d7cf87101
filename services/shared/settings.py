"""Settings shared by every service: which Kafka to use and how to reach it.

Each service has its own pydantic-settings class with its own env prefix (``EVHUB_PUBLISHER_`` …) and embeds
:class:`KafkaSettings`. Settings are built once in a ``__main__`` and passed down; nothing else reads the
environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.local_kafka import default_cache_dir


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
    heap_mb: int = Field(default=512, ge=256, le=8192)
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    replication_factor: int = Field(default=1, ge=1, le=7, description="for the hub's topics")
    min_insync_replicas: int = Field(default=1, ge=1, le=7, description="for the hub's topics")
