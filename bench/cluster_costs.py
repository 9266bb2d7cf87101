"""``python -m bench.cluster_costs``: what a local three-broker cluster costs on this machine, per layout.

Starts, one after the other, the layouts ``services.shared.local_cluster`` can run — three brokers with a
three-voter controller quorum (the one the hub uses) and three combined broker+controller nodes (measured only to
compare) — plaintext and locked down, with the lean JVM options and the JVM's defaults, and prints a Markdown table:
start-up (launch until every node serves), CPU seconds the JVMs spent starting, CPU seconds over the next
``--idle`` seconds, and each JVM's resident memory. docs/operations.md quotes a run. Nothing is kept.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from services.shared.local_cluster import LEAN_JVM, LocalCluster
from services.shared.local_kafka import ensure_jars
from services.shared.settings import KafkaSettings

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, after the command name


def measure(libs: Path, *, combined: bool, secure: bool, lean: bool, idle_s: float) -> str:
    cluster = LocalCluster.throwaway(libs, combined=combined, secure=secure, jvm_options=LEAN_JVM if lean else ())
    load = os.getloadavg()[0]
    try:
        cluster.start()
        pids = {i: n.pid for i, n in cluster.nodes.items() if n.pid is not None}
        started = {i: _cpu_seconds(p) for i, p in pids.items()}
        time.sleep(idle_s)  # the measurement window itself
        idle = sum(_cpu_seconds(p) for p in pids.values()) - sum(started.values())
        rss = cluster.rss_mb()
    finally:
        cluster.stop()
    layout = "3 combined nodes" if combined else "3 brokers + 3 controllers"
    per_jvm = ", ".join(f"{i}: {mb:.0f}" for i, mb in sorted(rss.items()))
    return (f"| {layout} | {'mTLS + ACLs' if secure else 'plaintext'} | {'lean' if lean else 'default'} "
            f"| {cluster.startup_seconds:.1f} s | {sum(started.values()):.0f} s | {idle / idle_s * 100:.0f} % "
            f"| {sum(rss.values()):.0f} MiB ({per_jvm}) | {load:.1f} |")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_costs", description=__doc__)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU to measure after start-up")
    args = parser.parse_args(argv)
    libs = ensure_jars(KafkaSettings().cache_dir)
    print("| layout | security | JVM | start-up | CPU to start | idle CPU (of one core) | resident memory, MiB per "
          "JVM | load before |\n|---|---|---|---:|---:|---:|---|---:|")  # fmt: skip
    for combined, secure, lean in [(False, True, True), (True, True, True), (False, False, True),
                                   (False, True, False)]:  # fmt: skip
        print(measure(libs, combined=combined, secure=secure, lean=lean, idle_s=args.idle), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
