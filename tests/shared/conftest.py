"""Fixtures of the shared-core tests: the real contract from ``schemas/``, fixed keys, a registry trusting them."""

from __future__ import annotations

import pytest

from services.shared.avro import AvroCodec
from services.shared.keys import SigningKey
from services.shared.registry import KeyRegistry, issue
from tests.shared.records import ANCHOR_SEED, NOT_AFTER, NOT_BEFORE, ORG, PUBLISHER_SEED, signing_key_from_seed


@pytest.fixture(scope="session")
def codec() -> AvroCodec:
    return AvroCodec.load()


@pytest.fixture(scope="session")
def anchor() -> SigningKey:
    return signing_key_from_seed(ANCHOR_SEED)


@pytest.fixture(scope="session")
def publisher() -> SigningKey:
    return signing_key_from_seed(PUBLISHER_SEED)


@pytest.fixture
def registry(codec: AvroCodec, anchor: SigningKey, publisher: SigningKey) -> KeyRegistry:
    """A registry trusting ``anchor``, with ``publisher`` valid from NOT_BEFORE until NOT_AFTER."""
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(issue(codec, anchor, public_key=publisher.public, organisation=ORG, not_before=NOT_BEFORE,
                    not_after=NOT_AFTER))  # fmt: skip
    return reg
