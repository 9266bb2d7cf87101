"""Feeds through real sockets, real mutual TLS 1.3 and the real broker: what each office receives, verified."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from services.shared import disclosure
from services.shared.envelope import open_envelope
from services.shared.kafka import evidence_topic
from tests.gateway.conftest import Hub, audit_log

pytestmark = pytest.mark.kafka


async def test_each_office_receives_what_the_policy_allows_with_only_the_disclosures_it_may_see(hub: Hub) -> None:
    """A RESTRICTED item: DE (PROTECTION clearance) gets every disclosure, SE (no PROTECTION) gets the item with the
    witness's identity withheld; a CONFIDENTIAL item is withheld from SE entirely and reveals nothing."""
    await hub.publish("ITEM-RESTRICTED", classification="RESTRICTED")
    await hub.publish("ITEM-CONFIDENTIAL", classification="CONFIDENTIAL")
    de, _ = await hub.drain("DE", until=lambda e: len(e) >= 2)
    se, _ = await hub.drain("SE", until=lambda e: len(e) >= 2)

    assert [(e["type"], e["event"]["item_id"]) for e in de] == [("event", "ITEM-RESTRICTED"),
                                                               ("event", "ITEM-CONFIDENTIAL")]  # fmt: skip
    assert [e["type"] for e in se] == ["event", "withheld"]
    assert set(se[1]) == {"type", "cursor", "receipt", "audit"}  # a refusal reveals nothing about the record

    for event, expected in ((de[0], {"witness.name", "location.exact"}), (se[0], {"location.exact"})):
        topic = event["topic"]
        verified = open_envelope(hub.stack.codec, base64.b64decode(event["envelope"]), topic=topic,
                                 keys=hub.stack.registry)  # fmt: skip
        assert verified.record["event_id"] == event["event"]["event_id"]
        revealed = disclosure.reveal(verified.disclosures, verified.record["protected"])
        assert set(revealed) == expected
    assert se[0]["withheld_fields"] == ["WITNESS_IDENTIFYING"]
    assert se[0]["disclosed_fields"] == ["LOCATION_EXACT"]
    assert de[0]["topic"] == evidence_topic(hub.codes["DE"])


async def test_every_receipt_is_in_the_audit_log_at_the_offset_the_office_was_given(hub: Hub) -> None:
    """The response names each entry's offset in hub.audit: the broker assigns it only when it acknowledges, so
    an office holding it holds proof that the entry was durable before the item was sent."""
    await hub.publish("ITEM-A", classification="RESTRICTED")
    await hub.publish("ITEM-B", classification="SECRET")
    se, _ = await hub.drain("SE", until=lambda e: len(e) >= 2)
    log = await audit_log(hub)
    for event in se:
        audited = log[event["receipt"]]
        assert (audited.offset, audited.index) == (event["audit"]["offset"], event["audit"]["index"])
        assert event["audit"]["topic"] == hub.settings.audit_topic
        entry = audited.entry
        assert entry["office"] == "SE-IPC"
        assert entry["action"] == "ReadItem"
        assert entry["item"]["offset"] == (event.get("offset", entry["item"]["offset"]))
        assert entry["client_cert_sha256"]
        assert entry["policy_version"]
    released, refused = (log[e["receipt"]].entry for e in se)
    assert released["decision"] == "RELEASED"
    assert released["withheld_fields"] == ["WITNESS_IDENTIFYING"]
    assert refused["decision"] == "REFUSED"
    assert refused["deny_source"] == "RULE"
    assert refused["determining_policies"] == ["classification-secret"]


async def test_a_cursor_resumes_exactly_where_the_page_ended(hub: Hub) -> None:
    for i in range(5):
        await hub.publish(f"ITEM-{i}", countries=("DE",))
    first, cursor = await hub.drain("DE", until=lambda e: len(e) >= 5)
    for i in range(5, 8):
        await hub.publish(f"ITEM-{i}", countries=("DE",))
    second, _ = await hub.drain("DE", cursor=cursor, until=lambda e: len(e) >= 3)
    ids = [e["event"]["item_id"] for e in first + second]
    assert sorted(ids) == [f"ITEM-{i}" for i in range(8)]
    # each event's own cursor resumes right after it
    status, body = await hub.page("DE", cursor=first[2]["cursor"])
    assert status == 200
    assert {e["offset"] for e in body["events"]}.isdisjoint({e["offset"] for e in first[:3] if e["partition"] ==
                                                             first[2]["partition"]})  # fmt: skip


async def test_a_long_poll_waits_for_the_next_record_and_is_safe_to_retry(hub: Hub) -> None:
    await hub.publish("ITEM-0", countries=("DE",))
    _, cursor = await hub.drain("DE", until=lambda e: len(e) >= 1)
    status, body = await hub.page("DE", cursor=cursor, wait=0.2)
    assert (status, body["events"]) == (200, [])
    await hub.publish("ITEM-1", countries=("DE",))
    status, body = await hub.page("DE", cursor=cursor, wait=20)
    _again_status, again = await hub.page("DE", cursor=cursor, wait=20)  # the same GET again: the same record
    assert [e["event"]["item_id"] for e in body["events"]] == ["ITEM-1"]
    assert [e["event"]["item_id"] for e in again["events"]] == ["ITEM-1"]
    assert body["events"][0]["receipt"] != again["events"][0]["receipt"]  # each delivery is its own audited read


async def test_sse_streams_the_feed_and_resumes_from_last_event_id(hub: Hub) -> None:
    await hub.publish("ITEM-0", countries=("DE",))
    await hub.publish("ITEM-1", countries=("DE",))
    headers = {"Accept": "text/event-stream"}
    async with hub.session() as s, s.get(hub.feed_url(), headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        events = await _read_sse(r, 2)
    assert [e[0] for e in events] == ["event", "event"]
    await hub.publish("ITEM-2", countries=("DE",))
    async with hub.session() as s, s.get(hub.feed_url(), headers={**headers, "Last-Event-ID": events[0][1]}) as r:
        resumed = await _read_sse(r, 2)
    got = sorted(e[2]["event"]["item_id"] for e in resumed)
    assert "ITEM-2" in got
    assert len(got) == 2


async def _read_sse(response: object, n: int) -> list[tuple[str, str, dict[str, Any]]]:
    import asyncio
    import json

    from aiohttp import ClientResponse

    assert isinstance(response, ClientResponse)
    out: list[tuple[str, str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(30):
        while len(out) < n:
            line = (await response.content.readline()).decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if not line:
                if "data" in fields:
                    out.append((fields.get("event", "message"), fields.get("id", ""), json.loads(fields["data"])))
                fields = {}
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
    return out


async def test_items_api_returns_the_latest_version_with_its_history(hub: Hub) -> None:
    await hub.publish("ITEM-V", countries=("DE",))
    await hub.drain("DE", until=lambda e: len(e) >= 1)  # the gateway has read it (the item index follows its reader)
    async with hub.session() as s, s.get(f"{hub.url}/v1/items/ITEM-V") as r:
        assert r.status == 200
        body = await r.json()
    assert body["latest"]["event"]["item_id"] == "ITEM-V"
    assert body["jurisdiction"] == hub.codes["DE"]
    assert body["withdrawn"] is False
    assert [h["type"] for h in body["history"]] == ["event"]
    async with hub.session("SE-IPC") as s, s.get(f"{hub.url}/v1/items/{uuid.uuid4().hex}") as r:
        assert r.status == 404
        assert r.content_type == "application/problem+json"
