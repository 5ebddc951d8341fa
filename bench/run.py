"""deferq's benchmark, side by side with peer queues, in one run.

    .venv/bin/python bench/run.py --n 20000

Runs the shared peer harness with the peers' venvs, then measures deferq on SQLite and (when
its store exists and a server answers) PostgreSQL: enqueue rates, processing rates of the
same no-op job, enqueue-to-start latency and worker memory. Prints every figure and writes
bench/RESULTS.md. See bench/README.md for the set-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(ROOT))

from bench import measure, peers, report, stores  # noqa: E402
from bench.redis_client import client_name, connect  # noqa: E402

FAST_PEERS = "dramatiq,huey_redis,huey_sqlite,saq,celery,procrastinate"
SLOW_PEERS = "rq,arq"
PATH_FLAGS = {"--peers-dir", "--peers-venv", "--arq-venv", "--results"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="executions per measurement")
    parser.add_argument("--slow-peers-n", type=int, default=3_000, help="n for rq and arq")
    parser.add_argument("--peers", default=FAST_PEERS, help="comma-separated peer systems")
    parser.add_argument("--slow-peers", default=SLOW_PEERS, help="peers run with --slow-peers-n")
    parser.add_argument(
        "--peers-dir",
        default=env("DEFERQ_BENCH_PEERS_DIR", str(ROOT.parent / "shared" / "bench" / "peers")),
        help="the peer harness [env DEFERQ_BENCH_PEERS_DIR; default ../shared/bench/peers]",
    )
    parser.add_argument(
        "--peers-venv",
        default=env("DEFERQ_BENCH_PEERS_VENV"),
        help="venv with the peers installed [env DEFERQ_BENCH_PEERS_VENV]",
    )
    parser.add_argument(
        "--arq-venv",
        default=env("DEFERQ_BENCH_ARQ_VENV"),
        help="venv with arq installed [env DEFERQ_BENCH_ARQ_VENV]",
    )
    parser.add_argument(
        "--slots",
        default="2,4",
        help="slots per worker: the first is tried with every --prefetch value, the others "
        "with the largest only",
    )
    parser.add_argument("--prefetch", default="0,2,16,64", help="prefetch values to try")
    parser.add_argument("--pg-processes", default="1,2", help="worker processes on PostgreSQL")
    parser.add_argument("--threads", type=int, default=16, help="concurrent callers")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=45.0,
        help="seconds a processing measurement may last; rates count what was done by then",
    )
    parser.add_argument("--latency-n", type=int, default=300)
    parser.add_argument("--latency-pause", type=float, default=0.02, help="mean pause, seconds")
    parser.add_argument(
        "--pg-url", default=None, help=f"[env DEFERQ_BENCH_PG; default {stores.DEFAULT_PG_URL}]"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to leave out: peers, sqlite, postgres, latency",
    )
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args(argv)


def numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def command_line(argv: list[str]) -> str:
    """The command as run, with paths of this machine replaced by placeholders."""
    shown = []
    hide_next = False
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if hide_next:
            shown.append(f"<{shown[-1].lstrip('-')}>")
            hide_next = False
        elif flag in PATH_FLAGS and "=" in arg:
            shown.append(f"{flag}=<{flag.lstrip('-')}>")
        else:
            shown.append(shlex.quote(arg))
            hide_next = flag in PATH_FLAGS
    prefix = [
        f"{name}=<{name.removeprefix('DEFERQ_BENCH_').lower().replace('_', '-')}>"
        for name in ("DEFERQ_BENCH_PEERS_VENV", "DEFERQ_BENCH_ARQ_VENV", "DEFERQ_BENCH_PEERS_DIR")
        if os.environ.get(name)
    ]
    return " ".join([*prefix, ".venv/bin/python", "bench/run.py", *shown])


def deferq_version() -> str:
    """The commit measured, and whether src/ differed from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    return f"commit {commit}" + (" with uncommitted changes in src/" if changed else "")


def machine(targets: list[object]) -> list[tuple[str, str]]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names_ = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
            model = names_[0] if names_ else "?"
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    info = [
        ("cores (nproc)", str(cores)),
        ("CPU", model),
        ("memory", f"{memory:.0f} GiB"),
        ("system", platform.platform(terse=True)),
        ("Python", platform.python_version()),
        ("deferq", deferq_version()),
        ("stores", ", ".join(t.server_version() for t in targets)),  # type: ignore[attr-defined]
        ("Redis client of the no-op job", client_name()),
        ("load average at start (1, 5, 15 min)", load),
    ]
    return info


def run_peers(args: argparse.Namespace, results: report.Results, pg_url: str) -> None:
    harness = Path(args.peers_dir).resolve()
    if not (harness / "run.py").exists():
        results.skipped.append("peers: no harness at --peers-dir")
        return
    parsed = urlparse(pg_url)
    pg_env = {
        key: value
        for key, value in (
            ("PGHOST", parsed.hostname or "127.0.0.1"),
            ("PGPORT", str(parsed.port or 5432)),
            ("PGUSER", parsed.username or "postgres"),
        )
        if key not in os.environ
    }
    fast = names(args.peers)
    slow = [s for s in names(args.slow_peers) if s != "arq"]
    if args.peers_venv:
        venv = Path(args.peers_venv).resolve()
        print(f"peers: n={args.n} {' '.join(fast)}", flush=True)
        results.peers += peers.run_harness(harness, venv, args.n, fast, pg_env)
        if slow:
            print(f"peers: n={args.slow_peers_n} {' '.join(slow)}", flush=True)
            results.peers += peers.run_harness(harness, venv, args.slow_peers_n, slow, pg_env)
    else:
        results.skipped.append("peers: no --peers-venv given")
    if "arq" in names(args.slow_peers) and args.arq_venv:
        print(f"peers: n={args.slow_peers_n} arq", flush=True)
        results.peers += peers.run_harness(
            harness, Path(args.arq_venv).resolve(), args.slow_peers_n, ["arq"], pg_env
        )


def worker_configs(args: argparse.Namespace, store: str) -> list[measure.WorkerConfig]:
    """Every prefetch value with the first slots value; the largest with the others."""
    slots, prefetches = numbers(args.slots), numbers(args.prefetch)
    configs = []
    for processes in numbers(args.pg_processes) if store == "PostgreSQL" else [1]:
        configs += [measure.WorkerConfig(processes, slots[0], p) for p in prefetches]
        configs += [measure.WorkerConfig(processes, s, max(prefetches)) for s in slots[1:]]
    return configs


def run_store(
    target: stores.SQLiteTarget | stores.PostgresTarget,
    args: argparse.Namespace,
    results: report.Results,
    redis: object,
    log_dir: Path,
) -> None:
    name, n = target.name, args.n
    if isinstance(target, stores.PostgresTarget):
        single, bare = measure.single_and_bare(target.fresh_url(), n)
        how = "bare psycopg insert + commit, one caller (taking turns with the row above)"
        results.enqueue.append(report.EnqueueRow(name, "single call, one caller", n, single))
        results.enqueue.append(report.EnqueueRow(name, how, n, bare))
        print(f"  {name}: bare psycopg insert+commit/s {bare:,.0f}", flush=True)
    else:
        single = measure.single_enqueue(target.fresh_url(), n)
        results.enqueue.append(report.EnqueueRow(name, "single call, one caller", n, single))
    print(f"  {name}: single-call enqueue/s {single:,.0f}", flush=True)
    many = measure.concurrent_enqueue(target.fresh_url(), n, args.threads)
    how = f"single call, {args.threads} threads at once"
    results.enqueue.append(report.EnqueueRow(name, how, n, many))
    print(f"  {name}: {how}: enqueue/s {many:,.0f}", flush=True)

    for config in worker_configs(args, name):
        run = measure.processing(
            name, target.fresh_url(), n, config, redis, log_dir, args.drain_timeout
        )
        results.processing.append(run)
        print(
            f"  {name}: {config.processes} x `{config.flags}` "
            f"processed/s {run.processed:,.0f} "
            f"steady/s {run.steady:,.0f} done={run.done} "
            f"bulk/s {min(run.bulk_rates):,.0f}-{max(run.bulk_rates):,.0f} "
            f"RSS {run.rss_start / 2**20:.0f}->{run.rss_end / 2**20:.0f} MB",
            flush=True,
        )

    if "latency" not in names(args.skip):
        lat = measure.latency(
            name, target.fresh_url(), args.latency_n, args.latency_pause, redis, log_dir
        )
        results.latency.append(lat)
        print(
            f"  {name}: latency p50/p99 to started_at "
            f"{report.ms(lat.percentile(lat.to_started_at, 0.5))}/"
            f"{report.ms(lat.percentile(lat.to_started_at, 0.99))} ms, to running "
            f"{report.ms(lat.percentile(lat.to_running, 0.5))}/"
            f"{report.ms(lat.percentile(lat.to_running, 0.99))} ms",
            flush=True,
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    skip = names(args.skip)
    began = time.monotonic()
    redis = connect()
    sqlite = stores.SQLiteTarget()
    targets: list[stores.SQLiteTarget | stores.PostgresTarget] = [sqlite]
    postgres, why_not = stores.postgres_target(args.pg_url)
    if postgres is not None and "postgres" not in skip:
        targets.append(postgres)
    results = report.Results(n=args.n, command=command_line(argv), machine=machine(targets))
    if postgres is None:
        results.skipped.append(f"PostgreSQL: {why_not}")
    if "sqlite" in skip:
        targets.remove(sqlite)

    if "peers" not in skip:
        run_peers(args, results, postgres.url if postgres else stores.DEFAULT_PG_URL)
    log_dir = Path(tempfile.mkdtemp(prefix="deferq-bench-logs-"))
    for target in targets:
        print(f"deferq on {target.name}: n={args.n}", flush=True)
        try:
            run_store(target, args, results, redis, log_dir)
        finally:
            target.cleanup()

    elapsed = time.monotonic() - began
    results.machine.append(("load average at end", ", ".join(f"{x:.2f}" for x in os.getloadavg())))
    results.machine.append(("run time", f"{elapsed / 60:.1f} min"))
    print("\n" + "\n".join(report.render(results)))
    print("\n" + "\n".join(report.render_targets(report.targets(results))))
    if not args.no_write:
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        report.write_results(Path(args.results), results, date)
        print(f"\nwrote {os.path.relpath(args.results)}; worker logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
