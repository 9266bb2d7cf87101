"""The publisher's rules, as a pure core fed the stored facts: is this request a replay, a conflict, a new version, a
correction that would leave a jurisdiction behind, a change to a withdrawn item?

Owns: the idempotency identity of a request (its stored key, its fingerprint, the conflict message if the key was
used for something else) and the decision for a publish, a correction and a withdrawal, given what the state holds
of the request's key and of the item. Like python-tuf's trusted metadata set, it is fed values and returns values
or raises; it reads nothing itself, so the pipeline can fetch the facts of a whole batch of requests at once.

Does not own: reading or writing the facts (``state``, ``pipeline``), signing, delivery.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.publisher import core
from services.shared.errors import Conflict, NotFound

#: The prefix of the fingerprint ``recover`` gives a request rebuilt from its event (the request is not in Kafka).
RECOVERED = "recovered:"


@dataclass(frozen=True)
class StoredRequest:
    """What the state holds of an earlier request, by its idempotency key."""

    fingerprint: str
    operation: str
    event_id: str
    item_id: str
    version: int

    @classmethod
    def of(cls, row: Any) -> StoredRequest:
        return cls(row["fingerprint"], row["operation"], row["event_id"], row["item_id"], int(row["version"]))


@dataclass(frozen=True)
class StoredItem:
    """What the state holds of an item: its latest version, where it was published, whether it is withdrawn."""

    item_id: str
    latest_version: int
    latest_event_id: str
    case_ids: tuple[str, ...]
    jurisdictions: tuple[str, ...]
    withdrawn_at: str | None = None

    @classmethod
    def of(cls, row: Any) -> StoredItem:
        return cls(row["item_id"], int(row["latest_version"]), row["latest_event_id"],
                   tuple(json.loads(row["case_ids"])), tuple(json.loads(row["jurisdictions"])),
                   row["withdrawn_at"])  # fmt: skip


@dataclass(frozen=True)
class Identity:
    """A request's idempotency identity: the stored key, the fingerprint of what it asks, and what to say if the
    key is found with another fingerprint."""

    key: str
    fingerprint: str
    reused: str


@dataclass(frozen=True)
class Replay:
    """The request was already done: answer with its event."""

    event_id: str
    version: int


@dataclass(frozen=True)
class NewVersion:
    """Make ``version`` of the item, replacing ``replaces`` (None for a first version), reaching every jurisdiction
    in ``jurisdictions`` (the request's and any the item was published to before)."""

    version: int
    replaces: str | None
    jurisdictions: tuple[str, ...]


def recovered(sha256: str | None) -> str:
    return f"{RECOVERED}{sha256 or ''}"


def is_recovered(fingerprint: str) -> bool:
    return fingerprint.startswith(RECOVERED)


def version_identity(meta: core.EvidenceMetadata, sha256: str, client_key: str | None,
                     correction_of: str | None) -> Identity:  # fmt: skip
    """The identity of a publish (``correction_of`` None) or a correction."""
    operation = "correct" if correction_of else "publish"
    # The operation is part of what a key stands for: a publish's key reused for a correction is a conflict.
    fingerprint = f"{operation}:{core.request_fingerprint(meta, sha256)}"
    # Without a key, a publication is identified by its item id and content digest.
    return _identity(
        client_key, f"publish:{meta.item_id}:{sha256}", fingerprint,
        f"item {meta.item_id} was already published with this file and other metadata; send a correction",
    )  # fmt: skip


def withdrawal_identity(item_id: str, reason: str, client_key: str | None) -> Identity:
    fingerprint = hashlib.sha256(f"withdraw\0{item_id}\0{reason}".encode()).hexdigest()
    return _identity(client_key, f"withdraw:{item_id}", fingerprint, f"item {item_id} is already withdrawn")


def _identity(client_key: str | None, derived_key: str, fingerprint: str, derived_conflict: str) -> Identity:
    """Client keys have their own namespace, so no key a client picks can collide with one derived from the
    request."""
    if client_key:
        return Identity(f"client:{client_key}", fingerprint,
                        "this Idempotency-Key was already used for a different request")  # fmt: skip
    return Identity(derived_key, fingerprint, derived_conflict)


def replay(identity: Identity, previous: StoredRequest | None) -> Replay | None:
    """The earlier result of this request, or None if its key is new.

    Raises: Conflict: the key was used for a different request.
    """
    if previous is None:
        return None
    # A row rebuilt from Kafka by `recover` keeps only what the event says (item id and content digest, which its
    # derived key already names), not the request's full fingerprint: a repeat of that publication is a replay.
    if previous.fingerprint != identity.fingerprint and not is_recovered(previous.fingerprint):
        raise Conflict(identity.reused)
    return Replay(previous.event_id, previous.version)


def plan_version(identity: Identity, *, item_id: str, jurisdictions: Sequence[str], sha256: str,
                 correction_of: str | None, previous: StoredRequest | None, item: StoredItem | None,
                 original: StoredRequest | None) -> Replay | NewVersion:  # fmt: skip
    """What a publish or correction does. ``previous``: the state's request under ``identity.key``; ``item``: the
    item; ``original``: the request that first published the item (looked at only for a publish of an existing
    item).

    Raises: Conflict (key reused, item already published, withdrawn, a jurisdiction left behind), NotFound.
    """
    done = replay(identity, previous)
    if done is not None:
        return done
    if correction_of is None:
        if item is None:
            return NewVersion(1, None, tuple(sorted(set(jurisdictions))))
        if original is not None and (original.fingerprint == identity.fingerprint  # same item, same content
                                     or original.fingerprint == recovered(sha256)):  # fmt: skip
            return Replay(original.event_id, original.version)
        raise Conflict(f"item {item_id} is already published; send a correction to change it")
    if item is None:
        raise NotFound(f"no item {correction_of}")
    if item.withdrawn_at is not None:
        raise Conflict(f"item {correction_of} was withdrawn")
    left_out = sorted(set(item.jurisdictions) - set(jurisdictions))
    if left_out:
        raise Conflict(
            f"a correction must reach every jurisdiction the item was published to; "
            f"{', '.join(left_out)} would keep version {item.latest_version} as current"
        )
    return NewVersion(item.latest_version + 1, item.latest_event_id,
                      tuple(sorted(set(jurisdictions) | set(item.jurisdictions))))  # fmt: skip


def plan_withdrawal(identity: Identity, *, item_id: str, previous: StoredRequest | None,
                    item: StoredItem | None) -> Replay | StoredItem:  # fmt: skip
    """A replay, or the item to withdraw.

    Raises: Conflict (key reused, already withdrawn), NotFound.
    """
    done = replay(identity, previous)
    if done is not None:
        return done
    if item is None:
        raise NotFound(f"no item {item_id}")
    if item.withdrawn_at is not None:
        raise Conflict(f"item {item_id} is already withdrawn")
    return item
