"""Policy versions: canonical hash, signatures, refusal of every bad version, and the version in force at T."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.model import ItemAttributes, Office
from services.policy.pack import PolicyPack
from services.policy.version import PolicyVersion, SignedPolicyVersion, from_record, sign, trusted_keys
from services.shared.errors import (
    ConfigurationError,
    DecodeError,
    InvalidSignature,
    PolicyError,
    TrustError,
    UntrustedKey,
)  # fmt: skip
from services.shared.keys import PublicKey, SigningKey, key_id_for
from tests.policy.conftest import APPENDED, V1_FROM

IDENTITY_POINT = bytes([1]) + bytes(31)  # small order: with it, any signature "verifies"
V2_FROM = datetime(2025, 6, 1, tzinfo=UTC)


def test_hash_is_stable_and_independent_of_office_order(v1: PolicyVersion) -> None:
    shuffled = v1.model_copy(update={"offices": tuple(reversed(v1.offices))})
    same_instant = v1.model_copy(update={"effective_from": V1_FROM.astimezone(UTC).replace(tzinfo=UTC)})
    assert shuffled.content_hash == v1.content_hash == same_instant.content_hash
    assert len(v1.content_hash) == 64
    body = json.loads(v1.canonical_bytes())
    assert body["effective_from"] == "2025-01-01T00:00:00.000000Z"
    assert [o["office_id"] for o in body["offices"]] == sorted(o.office_id for o in v1.offices)


def test_record_round_trips_with_identical_hash(signed_v1: SignedPolicyVersion) -> None:
    again = from_record(signed_v1.to_record())
    assert again == signed_v1
    assert again.content_hash == signed_v1.content_hash


def _tampered_text(s: SignedPolicyVersion, k: SigningKey) -> SignedPolicyVersion:
    text = s.version.policy_text.replace('"PROTECTION"', '"NONE"')
    return s.model_copy(update={"version": s.version.model_copy(update={"policy_text": text})})


def _tampered_offices(s: SignedPolicyVersion, k: SigningKey) -> SignedPolicyVersion:
    offices = tuple(o.model_copy(update={"clearances": ("SECRET", "PROTECTION")}) for o in s.version.offices)
    return s.model_copy(update={"version": s.version.model_copy(update={"offices": offices})})


def _backdated_signature(s: SignedPolicyVersion, k: SigningKey) -> SignedPolicyVersion:
    moved = s.version.model_copy(update={"effective_from": V1_FROM - timedelta(days=1)})
    return s.model_copy(update={"version": moved})


REFUSALS: dict[str, tuple[Callable[[SignedPolicyVersion, SigningKey], SignedPolicyVersion], type[TrustError]]] = {
    "unsigned": (lambda s, k: SignedPolicyVersion(version=s.version), UntrustedKey),
    "signed by an untrusted key": (lambda s, k: sign(s.version, SigningKey.generate()), UntrustedKey),
    "trusted key id, other key's signature": (
        lambda s, k: s.model_copy(update={"signature": sign(s.version, SigningKey.generate()).signature}),
        InvalidSignature),
    "truncated signature": (lambda s, k: s.model_copy(update={"signature": (s.signature or b"")[:63]}),
                            InvalidSignature),
    "tampered policy text": (_tampered_text, InvalidSignature),
    "tampered offices": (_tampered_offices, InvalidSignature),
    "tampered effective_from": (_backdated_signature, InvalidSignature),
    "low-order key id, zero signature": (
        lambda s, k: s.model_copy(update={"key_id": key_id_for(IDENTITY_POINT),
                                          "signature": IDENTITY_POINT + bytes(32)}), UntrustedKey),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_untrusted_versions_are_refused(
    case: tuple[Callable[[SignedPolicyVersion, SigningKey], SignedPolicyVersion], type[TrustError]],
    admin_key: SigningKey, signed_v1: SignedPolicyVersion, pack: PolicyPack,
) -> None:  # fmt: skip
    make, error = case
    store = PolicyStore(trusted=trusted_keys([admin_key.public]))
    with pytest.raises(error):
        store.accept(make(signed_v1, admin_key), appended_at=APPENDED)
    assert store.history() == []
    assert store.ingest(make(signed_v1, admin_key).to_record(), where="t@0", appended_at=APPENDED) is None
    assert store.rejected[error.__name__] == 1
    assert PolicyEngine(store).decide("DE-GBA-WCU", "ReadItem", _item(), V2_FROM).allowed is False


def test_low_order_key_cannot_be_configured() -> None:
    with pytest.raises(UntrustedKey):
        PublicKey.from_raw(IDENTITY_POINT)


def test_no_trusted_keys_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        trusted_keys([])


def _item() -> ItemAttributes:
    return ItemAttributes(item_id="i", jurisdictions=("DE",), case_ids=("CASE-SY-001",), classification="PUBLIC")


def _variant(pack: PolicyPack, **changes: object) -> PolicyVersion:
    fields: dict[str, object] = {
        "policy_text": pack.policy_text,
        "schema_text": pack.schema_text,
        "offices": pack.offices,
        "author": "policy-board",
        "effective_from": V2_FROM,
    }
    return PolicyVersion.model_validate({**fields, **changes})  # fmt: skip


INVALID = {
    "does not parse": ({"policy_text": "permit(principal, action resource);"}, "unexpected token"),
    "unknown attribute": ({"policy_text": '@id("x") permit(principal, action, resource) when { resource.colour };'},
                          "attribute `colour`"),
    "wrong type": ({"policy_text": '@id("x") permit(principal, action, resource) when { principal.jurisdiction };'},
                   "type"),
    "unknown action": ({"policy_text": '@id("x") permit(principal, action == Action::"Delete", resource);'},
                       "Delete"),
    "no @id": ({"policy_text": "permit(principal, action, resource);"}, "@id"),
    "duplicate @id": ({"policy_text": '@id("a") permit(principal, action, resource);\n'
                                      '@id("a") forbid(principal, action, resource);'}, "duplicate @id"),
    "names an item": ({"policy_text": '@id("x") permit(principal, action, resource == Item::"i");'},
                      "may not name an Item"),
    "empty policy set": ({"policy_text": "// nothing\n"}, "empty"),
    "schema does not parse": ({"schema_text": "entity Office = {"}, "schema"),
    "offices do not conform": ({"offices": (Office(office_id="X", jurisdiction="DE"),),
                                "schema_text": "<replaced>"}, "offices"),
}  # fmt: skip


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_version_is_rejected_with_diagnostics_and_changes_nothing(
    case: tuple[dict[str, object], str], store: PolicyStore, admin_key: SigningKey, pack: PolicyPack
) -> None:
    changes, expected = case
    if changes.get("schema_text") == "<replaced>":
        schema = pack.schema_text.replace("entity Office = {", "entity Office = { region: String,")
        changes = {**changes, "schema_text": schema}
    before = store.in_force(V2_FROM + timedelta(days=1))
    bad = sign(_variant(pack, **changes), admin_key)
    with pytest.raises(PolicyError) as caught:
        store.accept(bad, appended_at=APPENDED)
    assert expected in str(caught.value.extensions["diagnostics"]), caught.value.extensions
    assert store.in_force(V2_FROM + timedelta(days=1)) is before
    assert len(store.history()) == 1
    assert store.ingest(bad.to_record(), where="t@1", appended_at=APPENDED) is None
    assert store.rejected["PolicyError"] == 1


def test_a_version_not_after_the_newest_is_refused(store: PolicyStore, admin_key: SigningKey, pack: PolicyPack) -> None:
    with pytest.raises(PolicyError, match="not after"):
        store.accept(sign(_variant(pack, effective_from=V1_FROM, author="someone else"), admin_key),
                     appended_at=APPENDED)  # fmt: skip
    assert len(store.history()) == 1


def test_reaccepting_a_known_version_is_a_no_op(store: PolicyStore, signed_v1: SignedPolicyVersion) -> None:
    assert store.accept(signed_v1, appended_at=APPENDED) is store.history()[0]
    assert len(store.history()) == 1


def _protected_for_se(pack: PolicyPack) -> tuple[Office, ...]:
    return tuple(o.model_copy(update={"clearances": (*o.clearances, "PROTECTION")}) if o.office_id == "SE-IPC"
                 else o for o in pack.offices)  # fmt: skip


def test_a_decision_at_a_past_time_uses_the_version_in_force_then(
    store: PolicyStore, admin_key: SigningKey, pack: PolicyPack, signed_v1: SignedPolicyVersion
) -> None:
    v2 = store.accept(sign(_variant(pack, offices=_protected_for_se(pack)), admin_key), appended_at=APPENDED)
    engine = PolicyEngine(store)
    witness = _item().model_copy(update={"jurisdictions": ("SE",), "protected_fields": ("WITNESS_IDENTIFYING",)})
    before = engine.decide("SE-IPC", "ReadItem", witness, datetime(2025, 3, 1, tzinfo=UTC))
    after = engine.decide("SE-IPC", "ReadItem", witness, datetime(2025, 7, 1, tzinfo=UTC))
    at_switch = engine.decide("SE-IPC", "ReadItem", witness, V2_FROM)
    assert (before.policy_version, before.withheld_fields) == (signed_v1.content_hash, ("WITNESS_IDENTIFYING",))
    assert (after.policy_version, after.withheld_fields) == (v2.content_hash, ())
    assert at_switch.policy_version == v2.content_hash
    none = engine.decide("SE-IPC", "ReadItem", witness, V1_FROM - timedelta(seconds=1))
    assert (none.allowed, none.policy_version, none.withheld_fields) == (False, None, ("WITNESS_IDENTIFYING",))


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b'{"format":"evhub-policy-version/1"}', b"{" + b" " * (1 << 20) + b"}"],
    ids=["empty", "text", "list", "no body", "huge"],
)
def test_corrupt_records_are_skipped_and_counted(store: PolicyStore, data: bytes) -> None:
    assert store.ingest(data, where="hub.policy[0]@9", appended_at=APPENDED) is None
    assert store.rejected == {"DecodeError": 1}
    assert len(store.history()) == 1


def test_stated_hash_must_match(signed_v1: SignedPolicyVersion) -> None:
    record = json.loads(signed_v1.to_record())
    record["hash"] = "0" * 64
    with pytest.raises(DecodeError, match="hash"):
        from_record(json.dumps(record).encode())


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_is_refused(data: st.DataObject) -> None:
    key = _KEY
    record = sign(_VERSION, key).to_record()
    index = data.draw(st.integers(0, len(record) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != record[index]))
    changed = record[:index] + bytes([byte]) + record[index + 1 :]
    store = PolicyStore(trusted=trusted_keys([key.public]))
    assert store.ingest(changed, where="fuzz", appended_at=APPENDED) is None
    assert sum(store.rejected.values()) == 1


_KEY = SigningKey.generate()
_VERSION = PolicyVersion(
    policy_text='@id("a")\npermit(principal, action == Action::"ReadFeed", resource);',
    schema_text=(Path(__file__).resolve().parents[2] / "policies" / "schema.cedarschema").read_text("utf-8"),
    offices=(Office(office_id="DE-X", jurisdiction="DE", clearances=("SECRET",)),),
    author="a", effective_from=V1_FROM,
)  # fmt: skip


PURE = ["services/policy/engine.py", "services/policy/version.py", "services/policy/model.py",
        "services/policy/compiled.py"]  # fmt: skip


@pytest.mark.parametrize("module", PURE)
def test_core_modules_do_no_io(module: str) -> None:
    tree = ast.parse((Path(__file__).resolve().parents[2] / module).read_text("utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"asyncio", "aiohttp", "aiokafka", "os", "time", "socket", "pathlib"}
