"""Sub-commands of ``evhub``. Each handler is ``async def (args) -> exit code``."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    from services.cli import (
        audit_cmd,
        certs_cmd,
        demo,
        kafka_cmd,
        keys_cmd,
        policy,
        publish_cmd,
        publisher_cmd,
        subscribe_cmd,
    )

    publish_cmd.register(sub)
    publisher_cmd.register(sub)
    keys_cmd.register(sub)
    certs_cmd.register(sub)
    policy.register(sub)
    subscribe_cmd.register(sub)
    audit_cmd.register(sub)
    kafka_cmd.register(sub)
    demo.register(sub)
