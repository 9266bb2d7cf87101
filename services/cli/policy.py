"""``evhub policy``: validate, push (sign + publish), history, show and explain policy versions.

Policy-admin key pairs come from ``evhub keys generate``.

Each handler is ``async def (args) -> exit code`` and raises ``services.shared.errors`` exceptions; ``main``
turns those into a one-line message and an exit code. ``push``/``history``/``show`` read and write ``hub.policy``
directly (``EVHUB_KAFKA_BOOTSTRAP``); ``explain`` evaluates locally, from the topic or from ``--policy-dir``.
Trusted policy-admin keys come from ``--trust PEM`` (repeatable) and ``EVHUB_POLICY_ADMIN_KEYS`` — the same
variable, read by the same settings class, as the policy service; so does the clock-skew allowance
(``EVHUB_POLICY_MAX_CLOCK_SKEW_S``). ``push`` checks the exact record it will publish with the service's own check
(:meth:`PolicyStore.check_record`) against those keys and the history on the topic, and publishes nothing if it
fails; the key it signs with is trusted only if it is among them.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.policy.compiled import CompiledPolicy, diagnose, policy_source
from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.model import ACTIONS, FeedRef, ItemAttributes
from services.policy.pack import SAMPLE_PACK, PolicyPack, load_item_json, load_items, load_pack
from services.policy.settings import PolicySettings
from services.policy.topic import load_store, publish_version
from services.policy.version import sign, trusted_keys
from services.shared.errors import ConfigurationError, EvidenceHubError, NotFound, PolicyError, ValidationFailed
from services.shared.kafka import POLICY_TOPIC
from services.shared.keys import SigningKey
from services.shared.settings import KafkaSettings, read_public_keys

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2026-01-31T12:00:00Z")
    return moment


def register(sub: Any) -> None:
    policy = sub.add_parser("policy", help="access-policy versions: validate, push, history, show, explain")
    verbs = policy.add_subparsers(dest="policy_command", required=True)

    def pack_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("path", type=Path, help="a policy pack directory or one .cedar file")
        p.add_argument("--schema", type=Path, help="the .cedarschema (default: the one next to the policies)")
        p.add_argument("--offices", type=Path, help="offices JSON (default: offices.json next to the policies)")

    def kafka_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--topic", default=POLICY_TOPIC, help=argparse.SUPPRESS)
        p.add_argument("--trust", type=Path, action="append", default=[], help="trusted admin public key (PEM)")

    validate = verbs.add_parser("validate", help="check a pack against its Cedar schema; print Cedar's findings")
    pack_args(validate)
    validate.set_defaults(handler=run_validate)

    push = verbs.add_parser("push", help="validate, sign with a policy-admin key and publish a new version")
    pack_args(push)
    kafka_args(push)
    push.add_argument("--key", type=Path, required=True, help="policy-admin private key (PEM, Ed25519)")
    push.add_argument("--author", required=True, help="who approved this version")
    push.add_argument("--effective-from", type=_time, help="when it takes effect (default: now)")
    push.set_defaults(handler=run_push)

    history = verbs.add_parser("history", help="every version on hub.policy, accepted or refused")
    kafka_args(history)
    history.set_defaults(handler=run_history)

    show = verbs.add_parser("show", help="one version: metadata, offices, policy text")
    show.add_argument("version", help="content hash (or a unique prefix of 8+ hex digits)")
    kafka_args(show)
    show.set_defaults(handler=run_show)


    explain = verbs.add_parser("explain", help="decide one read and print the policies that determined it")
    kafka_args(explain)
    explain.add_argument("--office", required=True)
    explain.add_argument("--item", help="an item id from --items, or @FILE with one item's attributes (JSON)")
    explain.add_argument("--feed", help="explain ReadFeed of this jurisdiction's feed instead of an item")
    explain.add_argument("--action", choices=ACTIONS, default="ReadItem")
    explain.add_argument("--at", type=_time, help="decision time (default: now)")
    explain.add_argument("--purpose")
    explain.add_argument("--items", type=Path, help="items JSON (default: items.json of the pack)")
    explain.add_argument("--policy-dir", type=Path, help="evaluate this local pack instead of hub.policy")
    explain.set_defaults(handler=run_explain)


def bootstrap() -> str:
    """Raises: ConfigurationError without ``EVHUB_KAFKA_BOOTSTRAP``."""
    found = KafkaSettings().bootstrap
    if not found:
        raise ConfigurationError("set EVHUB_KAFKA_BOOTSTRAP to the cluster holding hub.policy")
    return found


def trusted_store(trust: list[Path]) -> PolicyStore:
    """An empty store trusting exactly the policy-admin keys a policy service configured like this shell would
    trust: ``trust`` (``--trust``) and ``EVHUB_POLICY_ADMIN_KEYS``, with the same clock-skew allowance.

    Raises:
        ConfigurationError: no key named (``--trust`` or ``EVHUB_POLICY_ADMIN_KEYS``), or one unusable.
    """
    settings = PolicySettings()
    paths: list[Path] = [*trust, *settings.admin_keys]
    keys = read_public_keys(paths, what="trusted policy-admin key", env="--trust or EVHUB_POLICY_ADMIN_KEYS")
    return PolicyStore(trusted=trusted_keys(keys), max_clock_skew=settings.max_clock_skew)


def _empty_store(args: argparse.Namespace) -> PolicyStore:
    return trusted_store(args.trust)


async def _store(args: argparse.Namespace) -> PolicyStore:
    return await load_store(bootstrap(), _empty_store(args), topic=args.topic)


def _check(args: argparse.Namespace, *, consequence: str) -> PolicyPack:
    """The pack at ``args.path``, validated. Cedar's findings are printed one per line.

    Raises:
        PolicyError: the pack has problems (``consequence`` says what that means for the caller).
    """
    pack = load_pack(args.path, schema=args.schema, offices=args.offices)
    problems = diagnose(pack.policy_text, pack.schema_text, pack.offices)
    if problems:
        for line in problems:
            print(f"  {line}")
        raise PolicyError(f"{args.path}: {len(problems)} problem(s); {consequence}")
    return pack


async def run_validate(args: argparse.Namespace) -> int:
    pack = _check(args, consequence="the version in force is unchanged")
    print(f"ok: {args.path} is valid ({len(pack.offices)} offices)")
    return 0


async def run_push(args: argparse.Namespace) -> int:
    pack = _check(args, consequence="nothing was published")
    try:
        key = SigningKey.from_pem(args.key.read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"cannot read {args.key}: {exc.strerror}") from exc
    # Decisions are taken at whole seconds: "now" rounded down takes effect at once, not up to a second later.
    effective = args.effective_from or datetime.now(UTC).replace(microsecond=0)
    version = pack.version(author=args.author, effective_from=effective)
    signed = sign(version, key)
    try:
        store = await _store(args)
    except NotFound:  # no version was ever pushed: the history is empty
        store = _empty_store(args)
    # The service's own check of the exact bytes about to be published: trusted admin keys, Cedar, ordering, and
    # not back-dated (the record is appended now). Nothing is published if it fails.
    store.check_record(signed.to_record(), appended_at=datetime.now(UTC))
    where = await publish_version(bootstrap(), signed, topic=args.topic, kafka=KafkaSettings())
    accepted = (await _store(args)).history()  # what every reader now holds, with the broker's timestamp
    if signed.content_hash not in {v.content_hash for v in accepted}:
        raise PolicyError(f"{signed.content_hash} was published ({where}) but readers refuse it; see evhub policy"
                          " history")  # fmt: skip
    print(f"pushed {signed.content_hash} ({where}), effective from {version.effective_from.isoformat()}")
    return 0


def _line(v: CompiledPolicy) -> str:
    return f"{v.content_hash}  {v.effective_from.isoformat()}  {v.version.author}  offices={len(v.offices)}"


async def run_history(args: argparse.Namespace) -> int:
    store = await _store(args)
    now = datetime.now(UTC)
    current = store.in_force(now)
    for v in store.history():
        mark = "*" if current is not None and v.content_hash == current.content_hash else " "
        print(f"{mark} {_line(v)}")
    refused = sum(store.rejected.values())
    print(
        f"{len(store.history())} version(s); * = in force now" + (f"; {refused} record(s) refused" if refused else "")
    )
    return 0


async def run_show(args: argparse.Namespace) -> int:
    v = (await _store(args)).get(args.version)
    print(_line(v))
    for office in v.version.offices:
        print(f"  office {office.office_id} ({office.jurisdiction}) clearances={','.join(office.clearances)}")
    print(v.version.policy_text)
    return 0


def _local_store(path: Path) -> PolicyStore:
    """A store holding the local pack as if it had always been in force (signed with a throw-away key)."""
    pack = load_pack(path)
    key = SigningKey.generate()
    store = PolicyStore(trusted=trusted_keys([key.public]))
    store.accept(sign(pack.version(author="local", effective_from=_EPOCH), key), appended_at=_EPOCH)
    return store


def _resource(args: argparse.Namespace) -> ItemAttributes | FeedRef:
    if args.feed:
        return FeedRef(jurisdiction=args.feed)
    if not args.item:
        raise ValidationFailed("give --item or --feed")
    if args.item.startswith("@"):
        try:
            return load_item_json(Path(args.item[1:]).read_text(encoding="utf-8"))
        except OSError as exc:
            raise NotFound(f"cannot read {args.item[1:]}: {exc.strerror}") from exc
    items_path = args.items or (args.policy_dir or SAMPLE_PACK) / "items.json"
    items = load_items(items_path)
    if args.item not in items:  # a typo is a question we can't answer, not a denial
        raise ValidationFailed(f"no item {args.item!r} in {items_path}; known: {', '.join(sorted(items))}")
    return items[args.item]


async def run_explain(args: argparse.Namespace) -> int:
    store = _local_store(args.policy_dir) if args.policy_dir else await _store(args)
    resource = _resource(args)
    at = args.at or datetime.now(UTC)
    action = "ReadFeed" if args.feed else args.action
    target = f"feed {args.feed}" if args.feed else f"item {args.item}"
    in_force = store.in_force(at)
    if in_force is not None and args.office not in in_force.offices:
        known = ", ".join(sorted(in_force.offices))
        raise ValidationFailed(f"no office {args.office!r} in the policy in force; known: {known}")
    decision = PolicyEngine(store).decide(args.office, action, resource, at, args.purpose)
    print(f"{'ALLOW' if decision.allowed else 'DENY '} {args.office} {action} {target} at {at.isoformat()}")
    compiled = store.in_force(at)
    if compiled is not None:
        source = "local pack, not a pushed version" if args.policy_dir else f"by {compiled.version.author}"
        print(f"  policy version: {compiled.content_hash} (effective {compiled.effective_from.isoformat()}, {source})")
    for reason in decision.reasons:
        print(f"  reason: {reason}")
    if decision.withheld_fields:
        print(f"  withheld fields: {', '.join(decision.withheld_fields)}")
    for error in decision.errors:
        print(f"  cedar error: {error}")
    for pid in decision.determining_policies:
        assert compiled is not None
        try:
            text = policy_source(compiled, pid)
        except EvidenceHubError:
            continue
        print("  determining policy:\n" + "\n".join(f"    {line}" for line in text.splitlines()))
    return 0 if decision.allowed else 1
