"""Bad input and attacks, each against the real broker and real mutual TLS (issue 10's table, row by row)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from services.gateway.service import gateway_topics
from services.shared.envelope import ENVELOPE_SCHEMA, open_envelope, seal
from services.shared.kafka import ensure_hub_topics, evidence_topic, read_to_end
from services.shared.principals import principal_uri
from services.shared.tls import CertFiles, issue_leaf
from tests.gateway.conftest import SECOND_DE, Hub, audit_log
from tests.publishing_stack import delete_topic

pytestmark = pytest.mark.kafka
PROBLEM = "application/problem+json"


async def _get(hub: Hub, path: str, who: str = "DE-GBA-WCU", **kw: Any) -> tuple[int, dict[str, Any], Any]:
    async with hub.session(who) as s, s.get(f"{hub.url}{path}", **kw) as r:
        body = await r.read()
        try:
            parsed: Any = await r.json(content_type=None)
        except ValueError:
            parsed = body
        return r.status, {**r.headers, "Content-Type": r.content_type}, parsed


# --- the feed ------------------------------------------------------------------------------------------------------


async def test_a_feed_the_policy_does_not_allow_is_403_and_an_audited_refusal(hub: Hub) -> None:
    status, headers, body = await _get(hub, f"/v1/feeds/{hub.codes['FR']}")
    assert (status, headers["Content-Type"]) == (403, PROBLEM)
    entry = (await audit_log(hub))[body["receipt"]].entry
    assert (entry["action"], entry["decision"], entry["office"]) == ("ReadFeed", "REFUSED", "DE-GBA-WCU")
    assert entry["jurisdiction"] == hub.codes["FR"]
    assert entry["item"] is None


def _tamper(cursor: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[-20] ^= 0x01  # an offset byte: a cursor that would skip or repeat records
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


async def test_forged_truncated_replayed_or_another_offices_cursor_is_400_never_a_restart(hub: Hub) -> None:
    await hub.publish("ITEM-1", countries=("DE", "FR"))
    _, cursor = await hub.drain("DE", until=lambda e: len(e) >= 1)
    _, fr_cursor = await hub.drain("FR", until=lambda e: len(e) >= 1)
    status, _, _ = await _get(hub, f"/v1/feeds/{hub.codes['DE']}", who=SECOND_DE, params={"cursor": ""})
    assert status == 200  # the second DE office may read the DE feed: only the cursor makes the difference below
    cases = {
        "forged": ("DE-GBA-WCU", "DE", _tamper(cursor)),
        "truncated": ("DE-GBA-WCU", "DE", cursor[:-6]),
        "not-base64": ("DE-GBA-WCU", "DE", "!!not a cursor!!"),
        "padded": ("DE-GBA-WCU", "DE", cursor + "=="),
        "another-office": (SECOND_DE, "DE", cursor),
        "another-jurisdiction": ("FR-PNAT", "DE", fr_cursor),
        "replayed-onto-another-jurisdiction": ("DE-GBA-WCU", "FR", cursor),
    }
    for name, (who, country, presented) in cases.items():
        status, headers, body = await _get(hub, f"/v1/feeds/{hub.codes[country]}", who=who,
                                           params={"cursor": presented})  # fmt: skip
        assert (status, headers["Content-Type"]) == (400, PROBLEM), name
        assert body["type"].endswith("/invalid-cursor"), name
        assert "events" not in body, name


async def test_a_cursor_made_under_a_retired_key_is_refused_and_one_under_an_older_configured_key_accepted(
    hub: Hub,
) -> None:
    await hub.publish("ITEM-1", countries=("DE",))
    _, cursor = await hub.drain("DE", until=lambda e: len(e) >= 1)
    rotated = {**hub.settings.cursor_keys, "k2": SecretStr(base64.urlsafe_b64encode(b"\x07" * 32).decode())}
    await hub.stop()
    await hub.start(cursor_keys=rotated, cursor_key_id="k2")  # rotation: k1 still verifies
    status, page = await hub.page("DE", cursor=cursor)
    assert (status, page["events"]) == (200, [])
    await hub.stop()
    await hub.start(cursor_keys={"k2": rotated["k2"]}, cursor_key_id="k2")  # k1 retired
    status, _, _ = await _get(hub, f"/v1/feeds/{hub.codes['DE']}", params={"cursor": cursor})
    assert status == 400


@pytest.mark.parametrize(("param", "value"), [("max", "0"), ("max", "100000"), ("wait", "-1"), ("wait", "x")])
async def test_out_of_range_page_parameters_are_problems(hub: Hub, param: str, value: str) -> None:
    status, headers, _ = await _get(hub, f"/v1/feeds/{hub.codes['DE']}", params={param: value})
    assert (status, headers["Content-Type"]) == (422, PROBLEM)


# --- identity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "audited"), [("auditor", False), ("nobody", False), ("UNKNOWN-OFFICE", True)],
    ids=["an-auditor", "no-principal", "an-office-the-policy-does-not-know"],
)  # fmt: skip
async def test_a_certificate_naming_no_known_office_is_refused(hub: Hub, who: str, audited: bool) -> None:
    await hub.publish("ITEM-1", countries=("DE",))
    status, headers, body = await _get(hub, f"/v1/feeds/{hub.codes['DE']}", who=who)
    assert (status, headers["Content-Type"]) == (403, PROBLEM)
    if audited:
        entry = (await audit_log(hub))[body["receipt"]].entry
        assert (entry["office"], entry["deny_source"]) == ("XX-UNKNOWN", "UNKNOWN_OFFICE")


def _context(ca: Path, files: CertFiles | None, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if files is not None:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def test_handshakes_without_an_acceptable_certificate_or_below_tls_1_3_are_refused(
    hub: Hub, tmp_path: Path
) -> None:
    office = (principal_uri("office", "DE-GBA-WCU"),)
    ca = hub.certs["gateway"].ca
    other_ca = issue_leaf(tmp_path / "other-ca", "DE-GBA-WCU", uris=office)
    expired = issue_leaf(hub.pki, "expired", uris=office, not_before=datetime.now(UTC) - timedelta(days=40), days=30)
    attempts = {
        "another-ca": _context(ca, other_ca),
        "no-certificate": _context(ca, None),
        "expired": _context(ca, expired),
        "tls-1.2": _context(ca, hub.certs["DE-GBA-WCU"], tls12=True),
    }
    for name, ctx in attempts.items():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            with pytest.raises(aiohttp.ClientError):  # no HTTP status at all: the handshake failed
                async with s.get(hub.feed_url()) as r:
                    pytest.fail(f"{name}: answered {r.status}")
    status, _, _ = await _get(hub, f"/v1/feeds/{hub.codes['DE']}")  # the same CA, a valid office certificate
    assert status == 200


# --- content -------------------------------------------------------------------------------------------------------


async def test_downloads_are_audited_ranged_and_carry_the_digest(hub: Hub) -> None:
    result = await hub.publish("ITEM-1", countries=("DE",))
    events, _ = await hub.drain("DE", until=lambda e: len(e) >= 1)
    [content] = events[0]["event"]["content"]
    sha256, size = content["sha256"], content["size"]
    path = f"/v1/items/{result.item_id}/content/{sha256}"
    status, headers, body = await _get(hub, path)
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == sha256
    assert base64.b64decode(headers["Repr-Digest"].removeprefix("sha-256=:").removesuffix(":")).hex() == sha256
    entry = (await audit_log(hub))[headers["Evidence-Receipt"]].entry
    assert (entry["action"], entry["decision"], entry["item"]["content_sha256"]) == ("ReadContent", "RELEASED", sha256)

    status, headers, part = await _get(hub, path, headers={"Range": "bytes=10-19"})
    assert (status, headers["Content-Range"], part) == (206, f"bytes 10-19/{size}", body[10:20])
    assert (await audit_log(hub))[headers["Evidence-Receipt"]].entry["item"]["content_range"] == "10-19"
    status, headers, _ = await _get(hub, path, headers={"Range": "bytes=-5"})
    assert (status, headers["Content-Range"]) == (206, f"bytes {size - 5}-{size - 1}/{size}")
    status, headers, _ = await _get(hub, path, headers={"Range": f"bytes={size}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{size}")


async def test_content_urls_for_what_an_office_may_not_have_are_404_without_touching_the_store(hub: Hub) -> None:
    mine = await hub.publish("ITEM-MINE", countries=("DE", "SE"), classification="RESTRICTED")
    secret = await hub.publish("ITEM-SECRET", countries=("DE", "SE"), classification="SECRET")
    events, _ = await hub.drain("DE", until=lambda e: len(e) >= 2)
    digest = {e["event"]["item_id"]: e["event"]["content"][0]["sha256"] for e in events}
    before = hub.content.touched
    attempts = {
        "traversal": f"/v1/items/..%2F..%2Fetc/content/{digest['ITEM-MINE']}",
        "traversal-in-digest": f"/v1/items/{mine.item_id}/content/..%2F..%2F..%2Fetc%2Fpasswd",
        "not-a-digest": f"/v1/items/{mine.item_id}/content/{'A' * 64}",
        "another-items-digest": f"/v1/items/{mine.item_id}/content/{digest['ITEM-SECRET']}",
        "not-readable-by-this-office": f"/v1/items/{secret.item_id}/content/{digest['ITEM-SECRET']}",
        "unknown-item": f"/v1/items/NO-SUCH-ITEM/content/{digest['ITEM-MINE']}",
    }
    for name, path in attempts.items():
        status, headers, _ = await _get(hub, path, who="SE-IPC")
        assert (status, headers["Content-Type"]) == (404, PROBLEM), name
    assert hub.content.touched == before
    status, _, _ = await _get(hub, f"/v1/items/{mine.item_id}/content/{digest['ITEM-MINE']}", who="SE-IPC")
    assert status == 200


async def test_a_withdrawn_items_content_is_no_longer_served_and_the_feed_delivers_the_withdrawal(hub: Hub) -> None:
    result = await hub.publish("ITEM-W", countries=("DE", "SE"), classification="SECRET")
    events, cursor = await hub.drain("DE", until=lambda e: len(e) >= 1)
    path = f"/v1/items/{result.item_id}/content/{events[0]['event']['content'][0]['sha256']}"
    assert (await _get(hub, path))[0] == 200
    await hub.stack.publisher.withdraw(result.item_id, "consent withdrawn")
    after, _ = await hub.drain("DE", cursor=cursor, until=lambda e: len(e) >= 1)
    assert [(e["type"], e["withdrawal"]["item_id"]) for e in after] == [("withdrawal", result.item_id)]
    assert (await _get(hub, path))[0] == 404
    se, _ = await hub.drain("SE", until=lambda e: len(e) >= 2)  # SE could never read it: nor learns it went
    assert [e["type"] for e in se] == ["withheld", "withheld"]
    status, _, item = await _get(hub, f"/v1/items/{result.item_id}")
    assert (status, item["withdrawn"], item["latest"], item["withdrawal"]["type"]) == (200, True, None, "withdrawal")


# --- the audit log and the views ------------------------------------------------------------------------------------


async def test_with_the_audit_topic_gone_nothing_is_released_and_the_gateway_recovers_by_itself(hub: Hub) -> None:
    await hub.publish("ITEM-1", countries=("DE",))
    await hub.drain("SE", until=lambda e: len(e) >= 0)  # the reader has verified it (SE's page is empty)
    await delete_topic(hub.stack.bootstrap, hub.settings.audit_topic)
    status, headers, body = await _get(hub, f"/v1/feeds/{hub.codes['DE']}")
    assert (status, headers["Content-Type"], headers["Retry-After"]) == (503, PROBLEM, "5")
    assert body["type"].endswith("/audit-unavailable")
    assert "events" not in body
    async with hub.session() as s, s.get(hub.feed_url(), headers={"Accept": "text/event-stream"}) as r:
        assert r.status == 503  # the stream refuses before its first byte too
    await ensure_hub_topics(hub.stack.bootstrap, gateway_topics(hub.settings), kafka=hub.settings.kafka)
    async with asyncio.timeout(60):
        while (result := await hub.page("DE"))[0] != 200:  # noqa: ASYNC110 - polling a server, not an event
            await asyncio.sleep(0.5)
    assert [e["event"]["item_id"] for e in result[1]["events"]] == ["ITEM-1"]


async def test_releases_stop_while_the_view_of_the_key_registry_is_too_old(hub: Hub) -> None:
    await hub.stop()
    await hub.start(max_view_age_s=2.0)
    await hub.publish("ITEM-1", countries=("DE",))
    assert (await hub.page("DE"))[0] == 200
    await delete_topic(hub.stack.bootstrap, hub.settings.keys_topic)  # the follower can no longer confirm its view
    async with asyncio.timeout(60):
        while (result := await hub.page("DE"))[0] == 200:  # noqa: ASYNC110 - polling a server, not an event
            await asyncio.sleep(0.2)
    status, body = result
    assert (status, body["type"].rsplit("/", 1)[1]) == (503, "stale-view")


# --- records injected straight into an evidence topic ---------------------------------------------------------------


async def test_injected_records_are_never_released_but_dead_lettered_and_counted(hub: Hub) -> None:
    codec, de, fr = hub.stack.codec, evidence_topic(hub.codes["DE"]), evidence_topic(hub.codes["FR"])
    await hub.publish("ITEM-GOOD-1", countries=("DE", "FR"))
    good = (await read_to_end(hub.stack.bootstrap, de))[0].value
    raw = codec.decode(good, expect=ENVELOPE_SCHEMA)
    raw["signatures"][0]["sig"] = bytes([raw["signatures"][0]["sig"][0] ^ 1]) + raw["signatures"][0]["sig"][1:]
    bad_signature = codec.encode(ENVELOPE_SCHEMA, raw)
    event = open_envelope(codec, good, topic=de, keys=hub.stack.registry).record
    replayed_sequence = seal(codec, schema="evidence_event", topic=de, signer=hub.stack.signer, sequence=1,
                             record={**event, "event_id": "forged-event", "title": "a different event"})  # fmt: skip
    from_france = (await read_to_end(hub.stack.bootstrap, fr))[0].value
    injected = {"InvalidSignature": bad_signature, "ReplayDetected": replayed_sequence,
                "copied-from-FR": from_france}  # fmt: skip
    for value in injected.values():
        await hub.produce(de, value, key=b"CASE-SY-001")
    await hub.publish("ITEM-GOOD-2", countries=("DE",))

    events, _ = await hub.drain("DE", until=lambda e: len(e) >= 2)
    assert sorted(e["event"]["item_id"] for e in events) == ["ITEM-GOOD-1", "ITEM-GOOD-2"]
    sent = {hashlib.sha256(base64.b64decode(e["envelope"])).hexdigest() for e in events}
    assert sent.isdisjoint(hashlib.sha256(v).hexdigest() for v in injected.values())

    letters = await read_to_end(hub.stack.bootstrap, hub.settings.deadletter_topic)
    reasons = sorted(dict(r.headers)["reason"].decode().split(":")[0] for r in letters)
    assert reasons == ["InvalidSignature", "InvalidSignature", "ReplayDetected"]  # FR's copy: signed for FR
    assert {r.value for r in letters} == set(injected.values())
    health = await hub.healthy()
    assert health["dead_letters"] == {"InvalidSignature": 2, "ReplayDetected": 1}
    assert health["readers"][hub.codes["DE"]]["rejected"] == 3
    # an office catching up from the beginning (the catch-up lane, not the live tail) gets no more than that
    await hub.stop()
    await hub.start(tail_records=16)
    again, _ = await hub.drain("DE", who=SECOND_DE, until=lambda e: len(e) >= 2)
    assert sorted(e["event"]["item_id"] for e in again) == ["ITEM-GOOD-1", "ITEM-GOOD-2"]


# --- embargo -------------------------------------------------------------------------------------------------------


async def test_an_item_withheld_under_embargo_is_delivered_once_when_the_embargo_ends(hub: Hub) -> None:
    ends = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
    sharing = {"allowed_jurisdictions": [], "purposes": [], "embargo_until": ends.isoformat()}
    await hub.publish("ITEM-EMBARGOED", countries=("DE",), sharing=sharing)
    await hub.publish("ITEM-OPEN", countries=("DE",))
    events, cursor = await hub.drain("DE", until=lambda e: len(e) >= 2)
    assert sorted(e["type"] for e in events) == ["event", "withheld"]
    late: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while not late:
            status, body = await hub.page("DE", cursor=cursor, wait=1)
            assert status == 200
            late += body["events"]
            cursor = body["cursor"]
    assert [(e["type"], e["event"]["item_id"], e["late"]) for e in late] == [("event", "ITEM-EMBARGOED", True)]
    assert datetime.now(UTC) >= ends
    withheld = next(e for e in events if e["type"] == "withheld")
    assert (await audit_log(hub))[withheld["receipt"]].entry["determining_policies"] == ["embargo"]
    status, body = await hub.page("DE", cursor=cursor, wait=1.5)
    assert (status, body["events"]) == (200, [])  # delivered once
