"""The publisher's rules as a table, on the pure core alone (no database, no Kafka): each row is a request, what
the state holds of it, and what the publisher must answer."""

from __future__ import annotations

from typing import Any

import pytest

from services.publisher import decide
from services.publisher.core import parse_metadata
from services.shared.errors import Conflict, NotFound
from tests.publisher.samples import metadata

SHA, OTHER_SHA = "a" * 64, "b" * 64
META = parse_metadata(metadata("ITEM-1", ["DE", "FR"]))
PUBLISH = decide.version_identity(META, SHA, None, None)
KEYED = decide.version_identity(META, SHA, "k1", None)
CORRECT = decide.version_identity(META, SHA, "fix", "ITEM-1")
ITEM = decide.StoredItem("ITEM-1", 1, "event-1", ("CASE-1",), ("DE", "FR"))


def _request(identity: decide.Identity, *, fingerprint: str | None = None, operation: str = "publish",
             version: int = 1) -> decide.StoredRequest:  # fmt: skip
    return decide.StoredRequest(fingerprint or identity.fingerprint, operation, f"event-{version}", "ITEM-1", version)


def _plan(identity: decide.Identity, *, correction_of: str | None = None, jurisdictions: tuple[str, ...] = ("DE", "FR"),
          sha256: str = SHA, **facts: Any) -> decide.Replay | decide.NewVersion:  # fmt: skip
    facts = {"previous": None, "item": None, "original": None} | facts
    return decide.plan_version(identity, item_id="ITEM-1", jurisdictions=jurisdictions, sha256=sha256,
                               correction_of=correction_of, **facts)  # fmt: skip


def test_a_new_item_is_version_1_to_its_jurisdictions() -> None:
    assert _plan(PUBLISH) == decide.NewVersion(1, None, ("DE", "FR"))


@pytest.mark.parametrize(
    ("name", "identity", "facts", "expected"),
    [
        ("same key, same request", KEYED, {"previous": _request(KEYED), "item": ITEM}, decide.Replay("event-1", 1)),
        ("same item and file, no key", PUBLISH, {"item": ITEM, "original": _request(PUBLISH)},
         decide.Replay("event-1", 1)),
        ("a publication rebuilt by recover", PUBLISH,
         {"item": ITEM, "original": _request(PUBLISH, fingerprint=decide.recovered(SHA))}, decide.Replay("event-1", 1)),
        ("a key rebuilt by recover", KEYED, {"previous": _request(KEYED, fingerprint=decide.recovered(SHA))},
         decide.Replay("event-1", 1)),
    ],
)  # fmt: skip
def test_replays(name: str, identity: decide.Identity, facts: dict[str, Any], expected: decide.Replay) -> None:
    assert _plan(identity, **facts) == expected, name


@pytest.mark.parametrize(
    ("name", "identity", "kw", "error", "says"),
    [
        ("key reused for another request", KEYED, {"previous": _request(KEYED, fingerprint="publish:other")},
         Conflict, "Idempotency-Key"),
        ("item published, other metadata", PUBLISH,
         {"item": ITEM, "original": _request(PUBLISH, fingerprint="publish:other")}, Conflict, "send a correction"),
        ("correction of an unknown item", CORRECT, {"correction_of": "ITEM-1"}, NotFound, "no item"),
        ("correction of a withdrawn item", CORRECT,
         {"correction_of": "ITEM-1", "item": decide.StoredItem("ITEM-1", 1, "e", ("C",), ("DE",), "2026-01-01")},
         Conflict, "withdrawn"),
        ("correction leaving FR behind", CORRECT, {"correction_of": "ITEM-1", "item": ITEM, "jurisdictions": ("DE",)},
         Conflict, "FR would keep version 1"),
    ],
)  # fmt: skip
def test_refusals(name: str, identity: decide.Identity, kw: dict[str, Any], error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        _plan(identity, **kw)


def test_a_correction_is_the_next_version_replacing_the_latest() -> None:
    item = decide.StoredItem("ITEM-1", 3, "event-3", ("CASE-1",), ("DE", "FR"))
    assert _plan(CORRECT, correction_of="ITEM-1", item=item, jurisdictions=("DE", "FR", "SE")) == decide.NewVersion(
        4, "event-3", ("DE", "FR", "SE")
    )


def test_a_publish_key_is_not_a_correction_key_and_client_keys_have_their_own_namespace() -> None:
    assert decide.version_identity(META, SHA, "k1", "ITEM-1").fingerprint != KEYED.fingerprint
    assert KEYED.key == "client:k1"
    assert PUBLISH.key == f"publish:ITEM-1:{SHA}"
    assert decide.version_identity(META, OTHER_SHA, None, None).key != PUBLISH.key


def test_withdrawals() -> None:
    identity = decide.withdrawal_identity("ITEM-1", "consent withdrawn", None)
    assert decide.plan_withdrawal(identity, item_id="ITEM-1", previous=None, item=ITEM) == ITEM
    done = decide.StoredRequest(identity.fingerprint, "withdraw", "event-w", "ITEM-1", 1)
    assert decide.plan_withdrawal(identity, item_id="ITEM-1", previous=done, item=ITEM) == decide.Replay("event-w", 1)
    with pytest.raises(NotFound):
        decide.plan_withdrawal(identity, item_id="ITEM-1", previous=None, item=None)
    withdrawn = decide.StoredItem("ITEM-1", 1, "e", ("C",), ("DE",), "2026-01-01")
    with pytest.raises(Conflict, match="already withdrawn"):
        decide.plan_withdrawal(identity, item_id="ITEM-1", previous=None, item=withdrawn)
    other = decide.withdrawal_identity("ITEM-1", "another reason", None)
    with pytest.raises(Conflict):
        decide.plan_withdrawal(other, item_id="ITEM-1", previous=done, item=ITEM)
