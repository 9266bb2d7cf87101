"""The policy state a service embeds: every accepted version, the engine deciding under them, and the follower
that keeps them current from ``hub.policy``.

Owns: feeding ``hub.policy`` records (with where they were read) into the :class:`PolicyStore`, and the rule that
decisions are refused until the topic has been replayed, after the follower failed, or — for a caller that sets a
bound — while the view of the topic is older than that bound. The policy service and the gateway embed this same
class; neither re-implements reading the topic.

Does not own: how versions are checked (``engine``), reading Kafka (``services.shared.follower``), HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from services.policy.engine import PolicyEngine, PolicyStore
from services.shared.errors import InfrastructureError
from services.shared.follower import Record, TopicFollower

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class PolicyState:
    store: PolicyStore
    engine: PolicyEngine
    follower: TopicFollower | None = None
    failure: BaseException | None = field(default=None, repr=False)

    @classmethod
    def create(cls, store: PolicyStore, *, cache_size: int = 65_536) -> PolicyState:
        return cls(store=store, engine=PolicyEngine(store, cache_size=cache_size))

    def ingest(self, record: Record) -> None:
        """Apply one ``hub.policy`` record (its Kafka timestamp is when it was appended: a version never takes
        effect before that); the store logs, counts and skips records it refuses."""
        self.store.ingest(record.value or b"", where=f"{record.topic}[{record.partition}]@{record.offset}",
                          appended_at=_EPOCH + timedelta(milliseconds=record.timestamp))  # fmt: skip

    def follow(self, *, bootstrap: str, topic: str, client_id: str) -> TopicFollower:
        """The follower that feeds this state (run it as a background task)."""
        self.follower = TopicFollower(bootstrap=bootstrap, topic=topic, client_id=client_id, on_record=self.ingest)
        return self.follower

    def ready(self, *, max_age_s: float | None = None) -> None:
        """Raises: InfrastructureError until the topic has been replayed, or after the follower failed;
        StaleView when ``max_age_s`` is set and the view of the topic is older."""
        if self.failure is not None:
            raise InfrastructureError("the policy follower failed; decisions are refused")
        if self.follower is None or not self.follower.caught_up.is_set():
            raise InfrastructureError("policy versions are still being loaded from Kafka")
        if max_age_s is not None:
            self.follower.check_fresh(max_age_s)
