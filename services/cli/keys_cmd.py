"""``evhub keys``: Ed25519 key pairs, and the publisher key registry on ``hub.keys`` (issue, revoke, list).

``register`` and ``revoke`` replay ``hub.keys`` as a receiver trusting the anchor would, build the next revision
from the key's current entry (a revocation carries over its organisation and validity window; only the revocation
and the per-topic cut-offs change), and apply the new record to that replayed registry before sending it — a
record receivers would refuse is never published.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from services.shared.avro import AvroCodec
from services.shared.errors import ConfigurationError, EvidenceHubError, ValidationFailed
from services.shared.kafka import (
    EVIDENCE_PREFIX,
    KEYS_TOPIC,
    evidence_topic,
    kafka_error,
    make_producer,
    read_to_end,
)
from services.shared.kafka_connection import KafkaConnection
from services.shared.keys import PublicKey, SigningKey
from services.shared.registry import KeyRegistry, issue
from services.shared.settings import KafkaSettings


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="signing keys and the publisher key registry").add_subparsers(
        dest="keys_command", required=True
    )
    gen = keys.add_parser("generate", help="write an Ed25519 pair: PREFIX.key (private, 0600) and PREFIX.pub.pem")
    gen.add_argument("prefix", type=Path)
    gen.set_defaults(handler=run_generate)
    for name, helptext in (
        ("register", "trust a publisher key (signed by a trust anchor)"),
        ("revoke", "revoke a publisher key; signatures up to --last-valid-sequence stay valid"),
    ):
        p = keys.add_parser(name, help=helptext)
        p.add_argument("--anchor-key", type=Path, required=True, help="trust anchor private key (PEM)")
        p.add_argument("--public-key", type=Path, required=True, help="publisher public key (PEM)")
        p.add_argument(
            "--revision",
            type=int,
            default=None,
            help="must exceed the key's previous record (default: the current one on hub.keys + 1)",
        )
        if name == "register":
            p.add_argument("--org", required=True, help="organisation the key belongs to")
            p.add_argument(
                "--not-before",
                type=_aware,
                default=None,
                help="start of validity (default: now; for a registered key, its current start)",
            )
            p.add_argument("--not-after", type=_aware, default=None)
        if name == "revoke":
            p.add_argument(
                "--last-valid",
                action="append",
                default=[],
                metavar="TOPIC=N",
                help="last genuine sequence number on TOPIC (repeatable; sequences count per topic)",
            )
            p.add_argument(
                "--last-valid-sequence",
                type=int,
                default=0,
                metavar="N",
                help="for topics not named with --last-valid (default 0: none stay valid)",
            )
        p.set_defaults(handler=run_register, revoke=name == "revoke")
    ls = keys.add_parser("list", help="the registry as a receiver sees it")
    ls.add_argument("--anchor", type=Path, action="append", required=True, help="trust anchor public key (PEM)")
    ls.set_defaults(handler=run_list)


def _aware(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2026-01-31T12:00:00Z")
    return moment


def _bootstrap() -> KafkaConnection:
    """The cluster, with this shell's client certificate (``EVHUB_KAFKA_SSL_*``) on a locked-down one.

    Raises:
        ConfigurationError: no bootstrap address, or incomplete or unreadable TLS files.
    """
    settings = KafkaSettings()
    if not settings.bootstrap:
        raise ConfigurationError("set EVHUB_KAFKA_BOOTSTRAP to the hub's Kafka cluster")
    return settings.connection()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from exc


async def run_generate(args: argparse.Namespace) -> int:
    """Raises: ConfigurationError if either file exists (a key is never overwritten) or can't be written."""
    key = SigningKey.generate()
    private = args.prefix.with_name(args.prefix.name + ".key")
    public = args.prefix.with_name(args.prefix.name + ".pub.pem")
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite, never world-readable
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.to_pem())
        with public.open("xb") as handle:
            handle.write(key.public.to_pem())
    except OSError as exc:
        raise ConfigurationError(f"cannot write {exc.filename}: {exc.strerror}") from exc
    print(f"{key.key_id}  private {private}  public {public}")
    return 0


async def run_register(args: argparse.Namespace) -> int:
    """Raises: ValidationFailed (revoking an unknown key, bad cut-offs), UntrustedKey (a record receivers would
    refuse: e.g. a re-registration under another organisation), ConfigurationError, KafkaUnavailable."""
    codec = AvroCodec.load()
    anchor = SigningKey.from_pem(_read(args.anchor_key))
    public = PublicKey.from_pem(_read(args.public_key))
    now = datetime.now(UTC)
    per_topic = _cut_offs(args.last_valid) if args.revoke else {}
    bootstrap = _bootstrap()
    registry = KeyRegistry(codec, anchors=[anchor.public])  # hub.keys as a receiver trusting this anchor sees it
    registry.apply_all(r.value for r in await read_to_end(bootstrap, KEYS_TOPIC) if r.value is not None)
    current = registry.entry(public.key_id) if public.key_id in registry.key_ids() else None
    revision = args.revision if args.revision is not None else (current.revision + 1 if current else 1)
    if args.revoke:
        if current is None:
            raise ValidationFailed(f"key {public.key_id[:16]}… is not on hub.keys under this anchor; nothing to revoke")
        # Only the revocation changes: the key's organisation and validity window are its history.
        organisation, not_before, not_after = current.organisation, current.not_before, current.not_after
    else:
        organisation = args.org
        not_before = args.not_before or (current.not_before if current else now)
        not_after = args.not_after
    record = issue(
        codec, anchor, public_key=public, organisation=organisation, not_before=not_before, not_after=not_after,
        revoked_at=now if args.revoke else None,
        last_valid_sequence=args.last_valid_sequence if args.revoke else None, last_valid_sequences=per_topic,
        revision=revision,
    )  # fmt: skip
    registry.apply(record)  # refused here → never sent: receivers would refuse it the same way
    producer = make_producer(bootstrap, client_id="evhub-keys")
    try:
        await producer.start()
        await producer.send_and_wait(KEYS_TOPIC, record, key=public.key_id.encode())
    except KafkaError as exc:
        raise kafka_error(exc, f"the key record was not written to {KEYS_TOPIC}", bootstrap) from exc
    finally:
        await producer.stop()
    print(f"{'revoked' if args.revoke else 'registered'} {public.key_id} for {organisation} (revision {revision})")
    return 0


def _cut_offs(values: list[str]) -> dict[str, int]:
    """Raises: ValidationFailed for anything but evidence.<JURISDICTION>=N with N ≥ 0."""
    out = {}
    for value in values:
        topic, _, number = value.partition("=")
        jurisdiction = topic.removeprefix(EVIDENCE_PREFIX)
        try:
            valid = topic.startswith(EVIDENCE_PREFIX) and evidence_topic(jurisdiction) == topic and number.isdigit()
        except ConfigurationError:
            valid = False
        if not valid:
            raise ValidationFailed(f"--last-valid takes TOPIC=N (e.g. evidence.DE=41873), not {value!r}")
        out[topic] = int(number)
    return out


async def run_list(args: argparse.Namespace) -> int:
    codec = AvroCodec.load()
    registry = KeyRegistry(codec, anchors=[PublicKey.from_pem(_read(p)) for p in args.anchor])
    records = await read_to_end(_bootstrap(), KEYS_TOPIC)
    for r in records:
        try:
            registry.apply(r.value)
        except EvidenceHubError as exc:
            print(f"offset {r.offset}: refused ({exc.detail})")
    for key_id in sorted(registry.key_ids()):
        e = registry.entry(key_id)
        state = "revoked" if e.revoked_at else "valid"
        print(f"{key_id}  {e.organisation}  {state}  from {e.not_before:%Y-%m-%d} rev {e.revision}")
    return 0
