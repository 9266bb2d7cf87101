"""``python -m bench``: the command line of the benchmark (``make bench``, ``make bench-quick``).

Owns: parsing options and choosing the mode — a full run (all scenarios, results into bench/results/ and the
generated region of docs/performance.md), ``--quick`` (small sizes; table on stdout, JSON to ``--out`` or a
temporary file, the docs page untouched), ``--scenario NAME`` (that scenario and its baseline; docs untouched),
``--profile NAME`` (cProfile, in-process) and the internal ``--child NAME`` a parent spawns per scenario. Cluster
scenarios run on a local three-broker cluster the parent starts (or ``--cluster-bootstrap``).

Exit codes: 0 all scenarios measured, 1 some scenario failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.harness import load_scenarios
from bench.runner import Plan, child_json, child_main, run_all, select
from services.shared.settings import KafkaSettings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Evidence Hub next to raw Kafka clients.")
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats; does not touch docs/")
    p.add_argument("--scenario", action="append", default=[], metavar="NAME", help="run NAME and its baseline")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--profile", metavar="NAME", help="run NAME once in-process under cProfile")
    p.add_argument("--top", type=int, default=25, help="functions to show with --profile")
    p.add_argument("--out", type=Path, help="write the JSON here (default: bench/results/, or a temp file)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    p.add_argument("--rounds", type=int, help="round-robin rounds, a fresh process each (default 3, quick 1)")
    p.add_argument("--repeats", type=int, help="measured repeats per scenario and round (default 3)")
    p.add_argument("--warmups", type=int, help="unmeasured warm-up calls per scenario (default 1)")
    p.add_argument("--events", type=int, help="events per call for every scenario (default: each its own)")
    p.add_argument("--record-size", type=int, help="bytes per record for every scenario")
    p.add_argument("--seconds", type=float, help="duration for duration-bound scenarios")
    p.add_argument(
        "--cluster-bootstrap",
        metavar="HOST:PORT,…",
        help="an existing replicated cluster (PLAINTEXT) for the cluster scenarios; default: start one",
    )
    p.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    return p


def _child(name: str, bootstrap: str, plan: Plan) -> int:
    spec = load_scenarios()[name]
    result = asyncio.run(child_main(spec, bootstrap=bootstrap, plan=plan))
    sys.stdout.write(child_json(result) + "\n")
    return 0


def _run(args: argparse.Namespace, plan: Plan) -> int:
    from bench import report  # deferred: children don't need it

    registry = load_scenarios()
    try:
        specs = select(registry, args.scenario)
    except KeyError as exc:
        print(f"bench: {exc.args[0]}", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    outcome = asyncio.run(run_all(specs, plan, KafkaSettings(), cluster_bootstrap=args.cluster_bootstrap))
    rows = report.build_rows(specs, outcome.results)
    table = report.markdown_table(rows)
    doc = report.document(rows, outcome, plan, started)
    out = args.out
    if out is None and plan.quick:
        out = Path(tempfile.gettempdir()) / f"evhub-bench-quick-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    documents = not (plan.quick or args.scenario or args.no_docs)
    path = report.write_json(doc, out=out, started=started, latest=documents)
    print(table)
    print(f"\nresults: {path}  ({outcome.wall_seconds:.0f} s; {report.load_summary(doc)})")
    failed = [r.name for r in rows if r.error]
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if documents:
        report.update_docs(report.generated_section(table, doc))
        print(f"updated {report.DOCS}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = Plan.for_mode(
        quick=args.quick, rounds=args.rounds, repeats=args.repeats, warmups=args.warmups, events=args.events,
        record_size=args.record_size, seconds=args.seconds,
    )  # fmt: skip
    if plan.rounds < 1 or plan.repeats < 1 or plan.warmups < 0:
        print("bench: --rounds and --repeats must be ≥ 1, --warmups ≥ 0", file=sys.stderr)
        return 2
    if args.child:
        if not args.bootstrap:
            print("bench: --child needs --bootstrap", file=sys.stderr)
            return 2
        return _child(args.child, args.bootstrap, plan)
    if args.list:
        for spec in load_scenarios().values():
            base = f"  (ratio to {spec.baseline})" if spec.baseline else "  (baseline)"
            print(f"{spec.name:28} {spec.unit:9} {spec.description}{base}")
        return 0
    if args.profile:
        from bench.profile import profile

        registry = load_scenarios()
        if args.profile not in registry:
            print(f"bench: unknown scenario {args.profile!r}; known: {', '.join(registry)}", file=sys.stderr)
            return 2
        print(asyncio.run(profile(registry[args.profile], plan, KafkaSettings(), limit=args.top)))
        return 0
    return _run(args, plan)


if __name__ == "__main__":
    raise SystemExit(main())
