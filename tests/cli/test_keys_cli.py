"""``evhub keys``: key pairs that are never overwritten or world-readable, and the registry on the real broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import build_parser
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.errors import ConfigurationError, UntrustedKey, ValidationFailed
from services.shared.kafka import KEYS_TOPIC, ensure_topics, hub_topics, read_to_end
from services.shared.keys import PublicKey, SigningKey
from services.shared.registry import KeyRegistry


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
    common = ["--anchor-key", str(tmp_path / "anchor.key"), "--public-key", str(tmp_path / "group.pub.pem"),
              "--org", "Documentation group"]  # fmt: skip
    assert await evhub("keys", "register", *common) == 0
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
