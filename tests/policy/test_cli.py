"""``evhub policy``: validate, push, history, show and explain, against the real broker."""

from __future__ import annotations

import argparse
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.cli.policy import register
from services.policy.pack import SAMPLE_PACK
from services.policy.topic import read_records
from services.shared.cluster import KafkaTarget
from services.shared.errors import (
    ConfigurationError,
    KafkaUnavailable,
    NotFound,
    PolicyError,
    UntrustedKey,
    ValidationFailed,
)
from services.shared.keys import SigningKey


async def evhub(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="evhub")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = await args.handler(args)
    return code


@pytest.fixture
def bad_pack(tmp_path: Path) -> Path:
    shutil.copytree(SAMPLE_PACK, tmp_path / "pack")
    path = tmp_path / "pack" / "evidence.cedar"
    path.write_text(path.read_text("utf-8") + '\n@id("typo")\npermit(principal, action, resource) '
                    "when { resource.clasification == \"PUBLIC\" };\n", "utf-8")  # fmt: skip
    return tmp_path / "pack"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    key = SigningKey.generate()
    private, public = tmp_path / "admin.pem", tmp_path / "admin.pub.pem"
    private.write_bytes(key.to_pem())
    public.write_bytes(key.public.to_pem())
    return private, public


async def test_validate_accepts_the_sample_pack(capsys: pytest.CaptureFixture[str]) -> None:
    assert await evhub("policy", "validate", str(SAMPLE_PACK)) == 0
    assert "is valid (3 offices)" in capsys.readouterr().out


async def test_validate_prints_cedar_diagnostics(bad_pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PolicyError, match="problem"):
        await evhub("policy", "validate", str(bad_pack / "evidence.cedar"))
    out = capsys.readouterr().out
    assert "[typo] for policy `policy11`, attribute `clasification` on entity type `Item` not found" in out


async def test_explain_a_local_pack(capsys: pytest.CaptureFixture[str]) -> None:
    code = await evhub("policy", "explain", "--policy-dir", str(SAMPLE_PACK), "--office", "SE-IPC",
                       "--item", "item-photo-0001", "--at", "2026-01-01T00:00:00Z")  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("ALLOW SE-IPC ReadItem item item-photo-0001")
    assert "withheld fields: VICTIM_IDENTIFYING" in out
    assert '@id("item-jurisdiction-and-assigned-case")' in out


@pytest.mark.parametrize(
    ("office", "item", "message"),
    [("DE-GBA-WCU", "no-such-item", "no item 'no-such-item'"), ("DE-GBA", "item-photo-0001", "no office 'DE-GBA'")],
    ids=["unknown-item", "unknown-office"],
)
async def test_explain_with_a_typo_is_an_input_error_listing_what_is_known(
    office: str, item: str, message: str
) -> None:
    with pytest.raises(ValidationFailed, match=message) as caught:
        await evhub("policy", "explain", "--policy-dir", str(SAMPLE_PACK), "--office", office, "--item", item)
    assert "known: " in caught.value.detail


@pytest.mark.kafka
async def test_push_history_show_explain(
    kafka: KafkaTarget, topic_name: str, keys: tuple[Path, Path], bad_pack: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("EVHUB_KAFKA_BOOTSTRAP", kafka.bootstrap)
    monkeypatch.delenv("EVHUB_POLICY_ADMIN_KEYS", raising=False)
    private, public = keys
    common = ["--topic", topic_name, "--trust", str(public)]
    push = ["policy", "push", str(SAMPLE_PACK), "--key", str(private), "--author", "policy-board", *common]

    with pytest.raises(PolicyError, match="back-dated"):  # effective before it would be appended
        await evhub(*push, "--effective-from", (datetime.now(UTC) - timedelta(minutes=5)).isoformat())
    assert await evhub(*push) == 0  # effective now
    pushed = capsys.readouterr().out.split()[1]
    with pytest.raises(PolicyError, match="not after"):
        await evhub(*push, "--effective-from", "2024-01-01T00:00:00Z")
    with pytest.raises(PolicyError):
        await evhub("policy", "push", str(bad_pack), "--key", str(private), "--author", "x", *common)

    assert await evhub("policy", "history", *common) == 0
    history = capsys.readouterr().out
    assert f"* {pushed}" in history
    assert "1 version(s)" in history
    assert "refused" not in history, "the refused pushes published nothing"

    assert await evhub("policy", "show", pushed[:12], *common) == 0
    assert '@id("embargo")' in capsys.readouterr().out

    code = await evhub("policy", "explain", "--office", "DE-GBA-WCU", "--item", "item-embargoed-0003",
                       "--at", "2029-12-31T23:59:59Z", *common)  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert f"policy version: {pushed}" in out
    assert "denied by embargo" in out
    code = await evhub("policy", "explain", "--office", "DE-GBA-WCU", "--item", "item-embargoed-0003",
                       "--at", "2030-01-01T00:00:00Z", *common)  # fmt: skip
    assert code == 0


@pytest.mark.kafka
async def test_push_refuses_a_key_the_service_would_not_trust_and_publishes_nothing(
    kafka: KafkaTarget, topic_name: str, keys: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Issue 8: push signed with any key, said "pushed", and the service then refused the version."""
    monkeypatch.setenv("EVHUB_KAFKA_BOOTSTRAP", kafka.bootstrap)
    _, trusted_public = keys
    stranger = tmp_path / "stranger.key"
    stranger.write_bytes(SigningKey.generate().to_pem())
    push = ["policy", "push", str(SAMPLE_PACK), "--key", str(stranger), "--author", "x", "--topic", topic_name]
    monkeypatch.setenv("EVHUB_POLICY_ADMIN_KEYS", f'["{trusted_public}"]')  # as the service is configured
    with pytest.raises(UntrustedKey, match="untrusted key"):
        await evhub(*push)
    monkeypatch.delenv("EVHUB_POLICY_ADMIN_KEYS")
    with pytest.raises(ConfigurationError, match="EVHUB_POLICY_ADMIN_KEYS"):  # no trust configured: no check
        await evhub(*push)
    with pytest.raises(NotFound):  # nothing was published: the topic was not even created
        await read_records(kafka.bootstrap, topic=topic_name)


@pytest.mark.kafka
async def test_history_needs_trusted_keys(kafka: KafkaTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVHUB_KAFKA_BOOTSTRAP", kafka.bootstrap)
    monkeypatch.delenv("EVHUB_POLICY_ADMIN_KEYS", raising=False)
    with pytest.raises(ConfigurationError):
        await evhub("policy", "history")


@pytest.mark.kafka
async def test_push_creates_the_policy_topic_with_the_configured_replication_factor(
    kafka: KafkaTarget, topic_name: str, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8: push created hub.policy at replication factor 1 whatever the cluster's configuration said."""
    private, public = keys
    monkeypatch.setenv("EVHUB_KAFKA_BOOTSTRAP", kafka.bootstrap)
    monkeypatch.setenv("EVHUB_KAFKA_REPLICATION_FACTOR", "2")  # one broker here: Kafka must refuse the topic
    with pytest.raises(KafkaUnavailable, match="InvalidReplicationFactor"):
        await evhub("policy", "push", str(SAMPLE_PACK), "--key", str(private), "--author", "x", "--topic", topic_name,
                    "--trust", str(public))  # fmt: skip
    with pytest.raises(NotFound):
        await read_records(kafka.bootstrap, topic=topic_name)
