"""How a hub client reaches Kafka: the bootstrap address and, on a locked-down cluster, its client certificate.

Owns: :class:`KafkaConnection`, the one value every Kafka client of the hub is built from — producers, consumers,
admin clients, topic followers (``kafka``, ``follower``) and the ACL administration (``kafka_admin``) — and how it
becomes each client library's options: aiokafka's ``security_protocol``/``ssl_context``, librdkafka's
``security.protocol``/``ssl.*``. With a certificate the client speaks mutual TLS (the hub's CA only, the broker's
name checked); without one, PLAINTEXT — the embedded development broker's default.

A bare address (``str``) is accepted wherever a connection is, and means PLAINTEXT: tests and tools on the embedded
broker. Services build theirs once from ``KafkaSettings.connection()``.

Does not own: which cluster (``cluster``), what a principal may do (``kafka_acls``), TLS contexts (``tls``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, TypeAlias

from services.shared.errors import ConfigurationError
from services.shared.tls import CertFiles, client_context


@dataclass(frozen=True)
class KafkaConnection:
    bootstrap: str
    #: The client's certificate, key and the CA that issued the brokers' certificates; None for PLAINTEXT.
    tls: CertFiles | None = None

    def __str__(self) -> str:  # log lines and error messages name the address, never the files
        return self.bootstrap

    @property
    def protocol(self) -> str:
        return "SSL" if self.tls is not None else "PLAINTEXT"

    def ssl_context(self) -> ssl.SSLContext | None:
        """Raises: ConfigurationError naming a certificate, key or CA file that cannot be loaded."""
        if self.tls is None:
            return None
        try:
            return client_context(self.tls)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load the Kafka client certificate {self.tls.cert} with key "
                                     f"{self.tls.key} and CA {self.tls.ca}: {exc}") from exc  # fmt: skip

    def aiokafka_options(self) -> dict[str, Any]:
        """``bootstrap_servers`` and the security options of any aiokafka client.

        Raises:
            ConfigurationError: the TLS files cannot be loaded.
        """
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.protocol}
        if self.tls is not None:
            options["ssl_context"] = self.ssl_context()
        return options

    def librdkafka_config(self) -> dict[str, str]:
        """The same for confluent-kafka (librdkafka): PEM files by path, the broker's host name verified."""
        config = {"bootstrap.servers": self.bootstrap, "security.protocol": self.protocol}
        if self.tls is not None:
            config |= {
                "ssl.certificate.location": str(self.tls.cert), "ssl.key.location": str(self.tls.key),
                "ssl.ca.location": str(self.tls.ca), "ssl.endpoint.identification.algorithm": "https",
            }  # fmt: skip
        return config


#: Anything a Kafka client of the hub can be built from: a connection, or a bare address (PLAINTEXT).
Kafka: TypeAlias = KafkaConnection | str


def connection_of(kafka: Kafka) -> KafkaConnection:
    return kafka if isinstance(kafka, KafkaConnection) else KafkaConnection(kafka)
