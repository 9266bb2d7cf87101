"""Fixtures for the access-policy tests: a run-time admin key (never committed) and the sample pack."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.pack import SAMPLE_PACK, PolicyPack, load_pack
from services.policy.version import PolicyVersion, SignedPolicyVersion, sign, trusted_keys
from services.shared.keys import SigningKey

V1_FROM = datetime(2025, 1, 1, tzinfo=UTC)
#: When the test versions were appended to hub.policy: before any of them takes effect.
APPENDED = V1_FROM - timedelta(days=1)


@pytest.fixture(scope="session")
def admin_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="session")
def pack() -> PolicyPack:
    return load_pack(SAMPLE_PACK)


@pytest.fixture
def v1(pack: PolicyPack) -> PolicyVersion:
    return pack.version(author="policy-board", effective_from=V1_FROM)


@pytest.fixture
def signed_v1(v1: PolicyVersion, admin_key: SigningKey) -> SignedPolicyVersion:
    return sign(v1, admin_key)


@pytest.fixture
def store(admin_key: SigningKey, signed_v1: SignedPolicyVersion) -> PolicyStore:
    s = PolicyStore(trusted=trusted_keys([admin_key.public]))
    s.accept(signed_v1, appended_at=APPENDED)
    return s


@pytest.fixture
def engine(store: PolicyStore) -> PolicyEngine:
    return PolicyEngine(store)
