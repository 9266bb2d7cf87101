"""``evhub keys``: key pairs that are never overwritten or world-readable, and the registry on the real broker —
including the key commands of docs/operations.md, run as written."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.cli.main import build_parser
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.envelope import open_envelope, seal
from services.shared.errors import ConfigurationError, UntrustedKey, ValidationFailed
from services.shared.kafka import KEYS_TOPIC, ensure_topics, hub_topics, make_producer, read_to_end
from services.shared.keys import PublicKey, SigningKey
from services.shared.registry import KeyRegistry, issue
from tests.shared.records import evidence_event

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
EVHUB = Path(sys.executable).with_name("evhub")  # the console script installed next to this interpreter


async def evhub(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    code: int = await args.handler(args)
    return code


async def test_generate_writes_a_usable_pair_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "admin"
    assert await evhub("keys", "generate", str(out)) == 0
    key = SigningKey.from_pem((tmp_path / "admin.key").read_bytes())
    assert (tmp_path / "admin.pub.pem").read_bytes() == key.public.to_pem()
    assert (tmp_path / "admin.key").stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigurationError, match=r"admin\.key"):
        await evhub("keys", "generate", str(out))


@pytest.mark.kafka
async def test_register_then_revoke_is_what_a_receiver_sees(
    kafka: KafkaTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_topics(kafka.bootstrap, hub_topics([]))
    monkeypatch.setenv("EVHUB_KAFKA_BOOTSTRAP", kafka.bootstrap)
    assert await evhub("keys", "generate", str(tmp_path / "anchor")) == 0
    assert await evhub("keys", "generate", str(tmp_path / "group")) == 0
    common = ["--anchor-key", str(tmp_path / "anchor.key"), "--public-key", str(tmp_path / "group.pub.pem")]
    assert await evhub("keys", "register", *common, "--org", "Documentation group") == 0
    for bad in ("evidence.DE", "DE=5", "evidence.de=5", "evidence.DE=-1"):
        with pytest.raises(ValidationFailed, match="TOPIC=N"):
            await evhub("keys", "revoke", *common, "--last-valid", bad)
    # no --revision: the next one after what hub.keys holds (a stale revision would be ignored by every receiver)
    cut_offs = ["--last-valid", "evidence.DE=10", "--last-valid", "evidence.FR=3"]
    assert await evhub("keys", "revoke", *common, *cut_offs) == 0

    codec = AvroCodec.load()
    registry = KeyRegistry(codec, anchors=[PublicKey.from_pem((tmp_path / "anchor.pub.pem").read_bytes())])
    registry.apply_all(r.value for r in await read_to_end(kafka.bootstrap, KEYS_TOPIC) if r.value)
    group = PublicKey.from_pem((tmp_path / "group.pub.pem").read_bytes())
    entry = registry.entry(group.key_id)
    assert (entry.revision, entry.revoked_at is not None) == (2, True)
    assert entry.last_valid_sequences == {"evidence.DE": 10, "evidence.FR": 3}
    assert registry.resolve(group.key_id, sequence=10, topic="evidence.DE") == group
    with pytest.raises(UntrustedKey):
        registry.resolve(group.key_id, sequence=4, topic="evidence.FR")


def documented_key_commands() -> list[list[str]]:
    """The ``evhub keys`` commands of docs/operations.md's "Keys" block, continuation lines joined, comments cut."""
    lines = OPERATIONS.read_text("utf-8").split("\n## Keys\n", 1)[1].splitlines()
    block = "\n".join(line[4:] for line in itertools.takewhile(lambda line: line.startswith("    "), lines))
    text = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in text.splitlines() if "evhub keys" in line]


def _run_documented(documented: list[str], *, cwd: Path, bootstrap: str, org: str) -> str:
    env, argv = dict(os.environ), list(documented)
    while "=" in argv[0]:  # VAR=… prefixes, as a shell would read them
        name, _, value = argv.pop(0).partition("=")
        env[name] = bootstrap if name == "EVHUB_KAFKA_BOOTSTRAP" else value
    assert argv[0] == "evhub"
    args = [org if a == "…" else a for a in argv[1:]]
    run = subprocess.run([str(EVHUB), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    assert run.returncode == 0, (argv, run.stderr)
    return run.stdout


def _sealed(codec: AvroCodec, group: SigningKey, org: str, topic: str, sequence: int, at: datetime) -> bytes:
    record = evidence_event(key_id=group.key_id, jurisdiction=topic.removeprefix("evidence."), published_at=at)
    record["publisher"] = {"organisation": org, "key_id": group.key_id}
    return seal(codec, schema="evidence_event", record=record, topic=topic, signer=group, sequence=sequence)


@pytest.mark.kafka
async def test_revocation_as_documented_keeps_what_the_key_signed_before_the_cut_off(
    kafka: KafkaTarget, tmp_path: Path
) -> None:
    """Issue 8: a revocation dated its validity from now, so every envelope signed before it became unverifiable."""
    await ensure_topics(kafka.bootstrap, hub_topics([]))
    org = "Documentation group (docs test)"
    commands = documented_key_commands()
    assert [c[c.index("evhub") + 2] for c in commands] == ["generate", "generate", "register", "revoke", "list"]
    generate_anchor, generate_group, register, revoke, listing = commands
    for argv in (generate_anchor, generate_group, register):
        _run_documented(argv, cwd=tmp_path, bootstrap=kafka.bootstrap, org=org)

    codec = AvroCodec.load()
    group = SigningKey.from_pem((tmp_path / "group.key").read_bytes())
    signed_at = datetime.now(UTC)  # after the registration, before the revocation
    envelopes = {(topic, n): _sealed(codec, group, org, topic, n, signed_at)
                 for topic, n in [("evidence.DE", 41873), ("evidence.DE", 41874), ("evidence.FR", 40112),
                                  ("evidence.FR", 40113)]}  # fmt: skip
    _run_documented(revoke, cwd=tmp_path, bootstrap=kafka.bootstrap, org=org)
    listed = _run_documented(listing, cwd=tmp_path, bootstrap=kafka.bootstrap, org=org)
    assert f"{group.key_id}  {org}  revoked" in listed

    anchor_public = PublicKey.from_pem((tmp_path / "anchor.pub.pem").read_bytes())
    registry = KeyRegistry(codec, anchors=[anchor_public])
    registry.apply_all(r.value for r in await read_to_end(kafka.bootstrap, KEYS_TOPIC) if r.value)
    for topic, below in (("evidence.DE", 41873), ("evidence.FR", 40112)):  # the cut-offs from the docs
        verified = open_envelope(codec, envelopes[(topic, below)], topic=topic, keys=registry)
        assert (verified.key_id, verified.sequence, verified.record["publisher"]["organisation"]) == (
            group.key_id, below, org)  # fmt: skip
        with pytest.raises(UntrustedKey, match="revoked"):
            open_envelope(codec, envelopes[(topic, below + 1)], topic=topic, keys=registry)

    # A forged but anchor-signed revision handing the key's past to another organisation is refused by receivers.
    anchor = SigningKey.from_pem((tmp_path / "anchor.key").read_bytes())
    entry = registry.entry(group.key_id)
    forged = issue(codec, anchor, public_key=group.public, organisation="Someone else", not_before=entry.not_before,
                   revision=entry.revision + 1)  # fmt: skip
    producer = make_producer(kafka.bootstrap, client_id="forger")
    await producer.start()
    try:
        await producer.send_and_wait(KEYS_TOPIC, forged, key=group.key_id.encode())
    finally:
        await producer.stop()
    replayed = KeyRegistry(codec, anchors=[anchor_public])
    replayed.apply_all(r.value for r in await read_to_end(kafka.bootstrap, KEYS_TOPIC) if r.value)
    assert (replayed.entry(group.key_id).organisation, replayed.entry(group.key_id).revision) == (org, 2)
    assert open_envelope(codec, envelopes[("evidence.DE", 41873)], topic="evidence.DE", keys=replayed).sequence
    listed = _run_documented(listing, cwd=tmp_path, bootstrap=kafka.bootstrap, org=org)
    assert "changes the key's organisation" in listed


@pytest.mark.kafka
async def test_register_refuses_to_send_a_record_receivers_would_refuse(
    kafka: KafkaTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_topics(kafka.bootstrap, hub_topics([]))
    monkeypatch.setenv("EVHUB_KAFKA_BOOTSTRAP", kafka.bootstrap)
    assert await evhub("keys", "generate", str(tmp_path / "anchor")) == 0
    assert await evhub("keys", "generate", str(tmp_path / "group")) == 0
    common = ["--anchor-key", str(tmp_path / "anchor.key"), "--public-key", str(tmp_path / "group.pub.pem")]
    assert await evhub("keys", "register", *common, "--org", "Group A") == 0
    before = len(await read_to_end(kafka.bootstrap, KEYS_TOPIC))
    with pytest.raises(UntrustedKey, match="organisation"):
        await evhub("keys", "register", *common, "--org", "Group B")
    assert len(await read_to_end(kafka.bootstrap, KEYS_TOPIC)) == before
