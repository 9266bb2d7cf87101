"""``evhub demo`` (``make demo``): the whole story on one machine, with real parts, from a fresh clone.

1. starts a real Kafka broker (Maven jars) and creates the hub's topics for DE, FR and SE;
2. mints a development PKI and keys: a trust anchor, the group's signing key, a policy-admin key;
3. registers the signing key on ``hub.keys`` and pushes the sample policy pack to ``hub.policy``;
4. starts the publisher as its own process (``python -m services.publisher``) behind mutual TLS;
5. an archivist publishes generated sample evidence (several cases; DE, FR, SE) with ``evhub publish``, then runs
   it again — everything is skipped, nothing is published twice;
6. each jurisdiction's feed is read back from Kafka and verified with nothing but the group's public key;
7. the policy decides what each prosecution office may read, and which protected fields it gets withheld;
8. starts the gateway and the audit log service as their own processes behind mutual TLS (``demo_offices``);
9. three prosecution offices (DE, FR, SE) subscribe with ``evhub subscribe --once``: each receives its own redacted
   view, verifies every signature, disclosure and file itself, and keeps it with its receipts.
Everything it started is stopped by PID at the end (or on Ctrl-C); ``--keep-running`` waits for Ctrl-C first.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.cli import manifest, samples
from services.cli.demo_audit import auditor_replays
from services.cli.demo_offices import offices_subscribe, read_path
from services.cli.publish import Journal, publish_all, summary
from services.cli.supervise import running_service
from services.policy.attributes import item_attributes
from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.model import READ_ITEM
from services.policy.pack import load_pack
from services.policy.topic import load_store, publish_version
from services.policy.version import sign, trusted_keys
from services.shared.avro import AvroCodec
from services.shared.cluster import akafka_cluster
from services.shared.envelope import open_envelope
from services.shared.errors import EvidenceHubError, ReplayDetected
from services.shared.kafka import KEYS_TOPIC, ensure_hub_topics, evidence_topic, hub_topics, make_producer, read_to_end
from services.shared.keys import SigningKey
from services.shared.local_kafka import free_port
from services.shared.registry import KeyRegistry, issue
from services.shared.sequences import SequenceTracker
from services.shared.settings import KafkaSettings
from services.shared.tls import client_context, create_dev_pki

JURISDICTIONS = ["DE", "FR", "SE"]
POLICY_PACK = Path(__file__).resolve().parents[2] / "policies"
OFFICES = {"DE": "DE-GBA-WCU", "FR": "FR-PNAT", "SE": "SE-IPC"}


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run the main job end to end on embedded defaults")
    demo.add_argument("--workdir", type=Path, default=Path("var/demo"), help="where keys, state and samples go")
    demo.add_argument("--keep-running", action="store_true", help="keep Kafka and the publisher up until Ctrl-C")
    demo.set_defaults(handler=run_demo)


def _write_key(path: Path, key: SigningKey) -> Path:
    path.write_bytes(key.to_pem())
    path.chmod(0o600)
    path.with_suffix(".pub.pem").write_bytes(key.public.to_pem())
    return path


async def run_demo(args: argparse.Namespace) -> int:
    out = Console()
    if not out.is_terminal:
        out = Console(width=150)  # a log file or CI: wide enough that the tables are not truncated
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    codec = AvroCodec.load()
    async with akafka_cluster(KafkaSettings()) as kafka:
        bootstrap = kafka.bootstrap
        out.rule("1. Kafka")
        out.print(f"Apache Kafka ({kafka.kind}) at {bootstrap}" + (f", started in {kafka.startup_seconds:.1f}s" if
                  kafka.pid else "") + (f"; log {kafka.log_file}" if kafka.log_file else ""))  # fmt: skip
        created = (await ensure_hub_topics(bootstrap, hub_topics(JURISDICTIONS), kafka=KafkaSettings())).created
        out.print(f"topics: {', '.join(created) or 'already there'}")

        out.rule("2. Keys and certificates (generated now, never committed)")
        pki = create_dev_pki(work / "pki", ["publisher", "archivist"])
        anchor, signer, admin = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
        keys = work / "keys"
        keys.mkdir()
        _write_key(keys / "trust-anchor.key", anchor)
        _write_key(keys / "publisher.key", signer)
        out.print(f"publisher signing key {signer.key_id[:16]}…, trust anchor {anchor.key_id[:16]}…, "
                  f"policy admin {admin.key_id[:16]}…; mTLS CA {pki['publisher'].ca}")  # fmt: skip

        out.rule("3. Key registry and access policy")
        producer = make_producer(bootstrap, client_id="evhub-demo")
        await producer.start()
        try:
            record = issue(codec, anchor, public_key=signer.public, organisation="Documentation group (demo)",
                           not_before=datetime.now(UTC) - timedelta(minutes=1))  # fmt: skip
            await producer.send_and_wait(KEYS_TOPIC, record, key=signer.key_id.encode())
        finally:
            await producer.stop()
        pack = load_pack(POLICY_PACK)
        # Whole seconds: decisions are taken at whole seconds, so a version effective at 12:00:00.6 would not be
        # in force at 12:00:00.9 — and the demo decides within a second or two of pushing.
        effective = datetime.now(UTC).replace(microsecond=0)
        signed = sign(pack.version(author="demo policy admin", effective_from=effective), admin)
        await publish_version(bootstrap, signed, kafka=KafkaSettings())
        out.print(f"publisher key registered on {KEYS_TOPIC}; policy version {signed.content_hash[:16]}… "
                  f"({len(pack.offices)} offices) pushed to hub.policy")  # fmt: skip

        out.rule("4. Publisher service (python -m services.publisher, mTLS)")
        port = free_port()
        env = {
            "EVHUB_KAFKA_BOOTSTRAP": bootstrap, "EVHUB_PUBLISHER_PORT": str(port),
            "EVHUB_PUBLISHER_DATA_DIR": str(work / "publisher"),
            "EVHUB_PUBLISHER_SIGNING_KEY_FILE": str(keys / "publisher.key"),
            "EVHUB_PUBLISHER_TRUST_ANCHOR_FILES": f'["{keys / "trust-anchor.pub.pem"}"]',
            "EVHUB_PUBLISHER_TLS_CERT": str(pki["publisher"].cert),
            "EVHUB_PUBLISHER_TLS_KEY": str(pki["publisher"].key),
            "EVHUB_PUBLISHER_TLS_CA": str(pki["publisher"].ca), "EVHUB_PUBLISHER_ALLOWED_CLIENTS": '["archivist"]',
            "EVHUB_PUBLISHER_JURISDICTIONS": '["DE", "FR", "SE"]',
        }  # fmt: skip
        url = f"https://127.0.0.1:{port}"
        ctx = client_context(pki["archivist"])
        async with running_service("services.publisher", env=env, health_url=f"{url}/healthz", ssl_context=ctx,
                                   log_file=work / "logs" / "publisher.log") as pid:  # fmt: skip
            out.print(f"publisher pid {pid} at {url}; log {work / 'logs' / 'publisher.log'}")
            await _publish(out, work, url, ctx)
            await _verify(out, codec, bootstrap, anchor)
            await _decide(out, codec, bootstrap, admin, anchor)
            _write_key(keys / "policy-admin.key", admin)
            async with read_path(out, work, bootstrap=bootstrap, offices=OFFICES,
                                 anchor_pub=keys / "trust-anchor.pub.pem",
                                 admin_pub=keys / "policy-admin.pub.pem") as path:  # fmt: skip
                await offices_subscribe(out, work, path, offices=OFFICES, anchor=anchor.public)
                de_proofs = work / "offices" / OFFICES["DE"] / "proofs"
                audited = await auditor_replays(out, work, path, bootstrap=bootstrap, log_dir=work / "audit" / "log",
                                                admin_pub=keys / "policy-admin.pub.pem", proofs=de_proofs)  # fmt: skip
                out.print("[green]the audit log verified, every decision in it reproduced, the office's receipt "
                          "proven offline, and the tampered copy caught[/green]" if audited else
                          "[bold red]the auditor's checks did not all come out as expected[/bold red]")  # fmt: skip
                if args.keep_running:
                    out.print(f"\nKafka at {bootstrap}, publisher at {url}, gateway at {path.gateway_url}, audit log "
                              f"at {path.audit_url}. Ctrl-C stops them all.")  # fmt: skip
                    await asyncio.Event().wait()
    out.rule("done")
    out.print("Everything the demo started has been stopped.")
    return 0


async def _publish(out: Console, work: Path, url: str, ctx: Any) -> None:
    out.rule("5. The archivist publishes (evhub publish), then runs it again")
    manifest_path = samples.write_sample(work / "samples")
    entries = manifest.load(manifest_path)
    for attempt in ("first run", "second run (resumed: nothing is published twice)"):
        journal = Journal(manifest_path.parent / ".evhub-publish.jsonl")
        outcomes = await publish_all(entries, url=url, ssl_context=ctx, journal=journal, concurrency=4)
        result = summary(outcomes)
        out.print(f"{attempt}: {result['total']} items, {result['bytes']:,} bytes → {result['published']} published, "
                  f"{result['already-published']} already published, {result['failed']} failed")  # fmt: skip
        for o in outcomes:
            if o.status == "failed":
                out.print(f"  [red]{o.item_id}: {o.error}")
    kinds = Counter(o.media_type for o in outcomes)
    out.print("media types detected from the bytes: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))


@dataclass
class FeedCheck:
    """One topic read back and verified. Delivery is at least once per record and exactly once per event: an
    identical envelope seen again is a *redelivery*, counted apart, never a second event."""

    topic: str
    records: int = 0
    verified: int = 0  # distinct events that verify
    redelivered: int = 0  # the same envelope again
    refused: int = 0  # undecodable, or not verifying with the trusted keys
    replayed: int = 0  # another envelope under a sequence number already seen (a key that signed twice)
    disclosed: int = 0
    gaps: int = 0


async def check_feed(codec: AvroCodec, bootstrap: str, topic: str, registry: KeyRegistry,
                     tracker: SequenceTracker) -> FeedCheck:  # fmt: skip
    """Read ``topic`` to its end and verify every record with only the registry's keys; a record that fails is
    counted, never the end of the check."""
    check = FeedCheck(topic)
    for record in await read_to_end(bootstrap, topic):
        check.records += 1
        try:
            verified = open_envelope(codec, record.value or b"", topic=topic, keys=registry)
            first = tracker.observe(verified.key_id, topic, verified.sequence, record.value or b"")
        except ReplayDetected:
            check.replayed += 1
            continue
        except EvidenceHubError:  # junk, a bad signature, an unknown key: refused, and the check goes on
            check.refused += 1
            continue
        if not first:
            check.redelivered += 1
            continue
        check.verified += 1
        check.disclosed += len(verified.disclosures)
    check.gaps = sum(last - first + 1 for (_, t), g in tracker.gaps().items() if t == topic for first, last in g)
    return check


async def _verify(out: Console, codec: AvroCodec, bootstrap: str, anchor: SigningKey) -> None:
    out.rule("6. Each feed verified end to end with only the group's public key")
    registry = KeyRegistry(codec, anchors=[anchor.public])
    registry.apply_all(r.value for r in await read_to_end(bootstrap, KEYS_TOPIC) if r.value is not None)
    tracker = SequenceTracker()
    table = Table("topic", "records", "verified", "redelivered", "refused", "replayed", "protected values disclosed",
                  "gaps", caption="redelivered: the same signed event again (at-least-once per record); "
                  "each event counts once")  # fmt: skip
    for j in JURISDICTIONS:
        c = await check_feed(codec, bootstrap, evidence_topic(j), registry, tracker)
        table.add_row(c.topic, str(c.records), str(c.verified), str(c.redelivered), str(c.refused), str(c.replayed),
                      str(c.disclosed), str(c.gaps))  # fmt: skip
    out.print(table)


async def _decide(out: Console, codec: AvroCodec, bootstrap: str, admin: SigningKey, anchor: SigningKey) -> None:
    out.rule("7. What each prosecution office may read (policy in force now)")
    store = await load_store(bootstrap, PolicyStore(trusted=trusted_keys([admin.public])))
    engine = PolicyEngine(store)
    registry = KeyRegistry(codec, anchors=[anchor.public])
    registry.apply_all(r.value for r in await read_to_end(bootstrap, KEYS_TOPIC) if r.value is not None)
    shown = 6
    table = Table(
        "office",
        "item",
        "classification",
        "decision",
        "protected fields withheld",
        "determined by",
        title=f"the first {shown} items of each office's feed, decided now for the purpose 'prosecution'",
    )
    now = datetime.now(UTC)
    for j, office in OFFICES.items():
        topic = evidence_topic(j)
        opened = [open_envelope(codec, r.value or b"", topic=topic, keys=registry)
                  for r in await read_to_end(bootstrap, topic)]  # fmt: skip
        withdrawn = {v.record["item_id"] for v in opened if v.schema == "evidence_withdrawal"}
        for event in [v.record for v in opened if v.schema == "evidence_event"][:shown]:
            attributes = item_attributes(event, withdrawn=event["item_id"] in withdrawn)
            d = engine.decide(office, READ_ITEM, attributes, now, purpose="prosecution")
            verdict = "[green]allow[/green]" if d.allowed else "[red]deny[/red]"
            withheld = ("(not released)" if not d.allowed else ", ".join(d.withheld_fields)) or "-"
            why = ", ".join(d.determining_policies) or "default deny"
            table.add_row(office, event["item_id"], event["classification"], verdict, withheld, why)
    out.print(table)
    info = engine.cache_info()
    out.print(f"{info.hits + info.misses} decisions, {info.misses} evaluated by Cedar, {info.hits} from the cache")
