"""What the publisher puts on Kafka verifies with the independent verifier written from docs/envelope.md alone —
not only the worked example, but real events and withdrawals from the real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.publisher.core import parse_metadata
from services.publisher.pipeline import ContentInfo
from services.shared.kafka import read_to_end
from services.shared.media import sniff
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack
from tests.shared import independent_verifier

pytestmark = pytest.mark.kafka


async def test_published_events_and_withdrawals_verify_with_the_documented_verifier(stack: Stack) -> None:
    data = png(seed=41)

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    stored = await stack.store.put(chunks(), max_size=1 << 20)
    content = ContentInfo(sha256=stored.sha256, size=stored.size, media_type=sniff(stored.head), file_name="f.png")
    result = await stack.publisher.publish(parse_metadata(metadata("SDG-INDEP-1", stack.jurisdictions)), content)
    await stack.publisher.withdraw("SDG-INDEP-1", "consent withdrawn")
    for delivery in result.deliveries:
        records = await read_to_end(stack.bootstrap, delivery.topic)
        opened = [independent_verifier.verify(r.value or b"", topic=delivery.topic, public_key=stack.signer.public.raw)
                  for r in records]  # fmt: skip
        assert [o.record.get("withdrawn_version") for o in opened] == [None, 1]
        assert [o.sequence for o in opened] == [1, 2]
        event, key = opened[0], stack.signer.public.raw
        assert event.record["content"][0]["sha256"] == stored.sha256
        assert event.record["jurisdiction"] == delivery.jurisdiction
        assert event.disclosed == {"witness.name": "A. K.", "location.exact": "33.5138N 36.2765E"}
        with pytest.raises(independent_verifier.Refused):
            independent_verifier.verify(records[0].value or b"", topic="evidence.XX", public_key=key)
