"""The tables of one run, the SPEC §7 targets judged on them, and bench/RESULTS.md."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import Latency, Processing
from bench.peers import PeerResult

OBSERVATIONS = "## Observations"
"""RESULTS.md keeps this section, written by hand, when a run rewrites the rest."""


@dataclass
class EnqueueRow:
    store: str
    how: str
    n: int
    rate: float


@dataclass
class Target:
    what: str
    deferq: str
    reference: str
    ratio: float | None
    goal: str
    met: bool | None


@dataclass
class Results:
    n: int
    command: str
    machine: list[tuple[str, str]]
    peers: list[PeerResult] = field(default_factory=list)
    enqueue: list[EnqueueRow] = field(default_factory=list)
    processing: list[Processing] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# Formatting


def rate(value: float) -> str:
    return f"{value:,.0f}"


def ms(seconds: float) -> str:
    return "—" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def mb(size: int) -> str:
    return f"{size / 2**20:.0f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# The targets


def bulk_rate(results: Results, store: str) -> float | None:
    rates = [r for p in results.processing if p.store == store for r in p.bulk_rates]
    return statistics.median(rates) if rates else None


def bulk_rows(results: Results) -> list[EnqueueRow]:
    rows = []
    for store in ("SQLite", "PostgreSQL"):
        runs = [p for p in results.processing if p.store == store]
        calls = [r for p in runs for r in p.bulk_rates]
        if calls:
            how = (
                f"bulk: enqueue_many of up to 10,000 (median of {len(calls)} calls; "
                f"{rate(min(calls))}–{rate(max(calls))})"
            )
            rows.append(EnqueueRow(store, how, sum(p.n for p in runs), statistics.median(calls)))
    return rows


def _enqueue(results: Results, store: str, how: str) -> float | None:
    return next((r.rate for r in results.enqueue if r.store == store and r.how == how), None)


def _best_processing(results: Results, store: str, processes: int | None) -> Processing | None:
    runs = [
        p
        for p in results.processing
        if p.store == store and (processes is None or p.config.processes == processes)
    ]
    return max(runs, key=lambda p: p.steady, default=None)


def _ratio_target(
    what: str, ours: float | None, ours_text: str, ref: float | None, ref_text: str, goal: float
) -> Target:
    if ours is None or not ref:
        return Target(what, ours_text if ours else "not measured", ref_text, None, "", None)
    ratio = ours / ref
    return Target(what, ours_text, ref_text, ratio, f"≥ {goal:g}x", ratio >= goal)


def targets(results: Results) -> list[Target]:
    peers = results.peers
    best_steady = max(peers, key=lambda p: p.steady, default=None)
    best_enqueue = max(peers, key=lambda p: p.enqueue, default=None)
    procrastinate = next((p for p in peers if p.system == "procrastinate"), None)
    steady_ref = (
        (best_steady.steady, f"{best_steady.label} {rate(best_steady.steady)}")
        if (best_steady)
        else (None, "no peers")
    )
    enqueue_ref = (
        (best_enqueue.enqueue, f"{best_enqueue.label} {rate(best_enqueue.enqueue)}")
        if (best_enqueue)
        else (None, "no peers")
    )
    found: list[Target] = []

    for store, processes, label in (
        ("SQLite", None, "Processing no-op, SQLite (steady/s)"),
        ("PostgreSQL", 2, "Processing no-op, PostgreSQL, 2 worker processes (steady/s)"),
    ):
        best = _best_processing(results, store, processes)
        text = f"{rate(best.steady)} ({best.config.flags})" if best else "not measured"
        found.append(_ratio_target(label, best.steady if best else None, text, *steady_ref, 3))

    single_sqlite = _enqueue(results, "SQLite", "single call, one caller")
    found.append(
        _ratio_target(
            "Single-call enqueue, SQLite",
            single_sqlite,
            rate(single_sqlite or 0),
            *enqueue_ref,
            3,
        )
    )
    single_pg = _enqueue(results, "PostgreSQL", "single call, one caller")
    found.append(
        _ratio_target(
            "Single-call enqueue, PostgreSQL vs procrastinate",
            single_pg,
            rate(single_pg or 0),
            procrastinate.enqueue if procrastinate else None,
            f"procrastinate {rate(procrastinate.enqueue)}" if procrastinate else "not measured",
            3,
        )
    )
    bare = next(
        (r.rate for r in results.enqueue if r.store == "PostgreSQL" and "bare psycopg" in r.how),
        None,
    )
    found.append(
        _ratio_target(
            "Single-call enqueue, PostgreSQL vs bare psycopg loop",
            single_pg,
            rate(single_pg or 0),
            bare,
            f"psycopg {rate(bare)}" if bare else "not measured",
            0.9,
        )
    )
    many_pg = next(
        (r for r in results.enqueue if r.store == "PostgreSQL" and "threads" in r.how), None
    )
    found.append(
        _ratio_target(
            "Many concurrent callers, PostgreSQL (peer figure: one caller)",
            many_pg.rate if many_pg else None,
            f"{rate(many_pg.rate)} ({many_pg.how})" if many_pg else "not measured",
            *enqueue_ref,
            2,
        )
    )
    found += _absolute_targets(results)
    return found


def _absolute_targets(results: Results) -> list[Target]:
    found = []
    for store in ("SQLite", "PostgreSQL"):
        bulk = bulk_rate(results, store)
        found.append(
            Target(
                f"Bulk enqueue, {store}",
                rate(bulk) if bulk else "not measured",
                "",
                None,
                "≥ 50,000/s",
                None if bulk is None else bulk >= 50_000,
            )
        )
    for store, limit in (("PostgreSQL", 0.005), ("SQLite", 0.020)):
        measured = next((lat for lat in results.latency if lat.store == store), None)
        # Judged on the function running, the later of the two instants measured.
        p50 = Latency.percentile(measured.to_running, 0.5) if measured else None
        text = "not measured"
        if measured and p50 is not None:
            text = (
                f"{ms(p50)} ({ms(Latency.percentile(measured.to_started_at, 0.5))} to started_at)"
            )
        found.append(
            Target(
                f"Enqueue-to-start latency p50, {store}, to the function running (ms)",
                text,
                "",
                None,
                f"< {limit * 1000:g} ms",
                None if p50 is None else p50 < limit,
            )
        )
    growths = [
        (p.rss_end / p.rss_start, p) for p in results.processing if p.rss_start and p.rss_end
    ]
    if growths:
        growth, worst = max(growths, key=lambda g: g[0])
        found.append(
            Target(
                "Worker memory flat (largest RSS growth from 10% to 100% of a drain)",
                f"{mb(worst.rss_start)} → {mb(worst.rss_end)} MB, {worst.store} "
                f"{worst.config.flags} x{worst.config.processes}",
                "",
                growth,
                "≤ 1.1x",
                growth <= 1.1,
            )
        )
    found.append(
        Target(
            "Rates with 1,000,000 executions stored",
            "claims by bench/scale.py: see At scale below",
            "",
            None,
            "±10%",
            None,
        )
    )
    return found


# Rendering


def render(results: Results) -> list[str]:
    """Every figure of the run, as Markdown tables."""
    lines = ["### Peers (shared harness, same run)", ""]
    lines += table(
        ["system", "broker", "n", "enqueue/s", "processed/s", "steady/s"],
        [
            [p.label, p.broker, str(p.n), rate(p.enqueue), rate(p.processed), rate(p.steady)]
            for p in results.peers
        ]
        or [["(not run)", "", "", "", "", ""]],
    )
    lines += ["", "### deferq: enqueue", ""]
    lines += table(
        ["store", "how", "n", "executions/s"],
        [[r.store, r.how, str(r.n), rate(r.rate)] for r in results.enqueue + bulk_rows(results)],
    )
    lines += ["", "### deferq: processing the no-op (`deferq worker -q ... bench.noop`)", ""]
    lines += table(
        [
            "store",
            "worker processes",
            "flags",
            "n",
            "processed/s",
            "steady/s",
            "done",
            "RSS at 10% (MB)",
            "RSS at end (MB)",
            "processes",
        ],
        [
            [
                p.store,
                str(p.config.processes),
                f"`{p.config.flags}`",
                str(p.n),
                rate(p.processed),
                rate(p.steady),
                str(p.done),
                mb(p.rss_start),
                mb(p.rss_end),
                str(p.process_count),
            ]
            for p in results.processing
        ],
    )
    lines += ["", "### deferq: enqueue-to-start latency, idle worker", ""]
    lines += table(
        [
            "store",
            "flags",
            "executions",
            "to started_at p50 (ms)",
            "p99",
            "to function running p50",
            "p99",
        ],
        [
            [
                lat.store,
                f"`{lat.flags}`",
                str(lat.count),
                ms(Latency.percentile(lat.to_started_at, 0.5)),
                ms(Latency.percentile(lat.to_started_at, 0.99)),
                ms(Latency.percentile(lat.to_running, 0.5)),
                ms(Latency.percentile(lat.to_running, 0.99)),
            ]
            for lat in results.latency
        ],
    )
    return lines


def render_targets(found: list[Target]) -> list[str]:
    def verdict(t: Target) -> str:
        return "—" if t.met is None else ("met" if t.met else "**not met**")

    return table(
        ["SPEC §7 target", "deferq", "reference", "ratio", "goal", ""],
        [
            [
                t.what,
                t.deferq,
                t.reference,
                f"{t.ratio:.2f}x" if t.ratio else "",
                t.goal,
                verdict(t),
            ]
            for t in found
        ],
    )


def where_we_stand(found: list[Target], results: Results) -> str:
    met = [f"{t.what}: {t.deferq}" for t in found if t.met]
    missed = [
        f"{t.what}: {t.ratio:.2f}x, goal {t.goal}"
        if t.ratio
        else f"{t.what}: {t.deferq}, goal {t.goal}"
        for t in found
        if t.met is False
    ]
    unknown = [t.what for t in found if t.met is None]
    measured = len(met) + len(missed)
    text = f"On this run deferq meets {len(met)} of the {measured} targets measured."
    if met:
        text += " Met: " + "; ".join(met) + "."
    if missed:
        text += " Not met: " + "; ".join(missed) + "."
    if unknown:
        text += " Not measured by this run: " + "; ".join(unknown) + "."
    if results.skipped:
        text += " Left out of this run: " + "; ".join(results.skipped) + "."
    return text


def write_results(path: Path, results: Results, date: str) -> None:
    found = targets(results)
    kept = ""
    if path.exists():
        old = path.read_text()
        if OBSERVATIONS in old:
            kept = old[old.index(OBSERVATIONS) :].rstrip() + "\n"
    lines = [
        "# Benchmark results",
        "",
        f"Written by `bench/run.py` on {date}; see bench/README.md to run it again.",
        "",
        "    " + results.command,
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in results.machine]
    lines += [
        "",
        "The machine is shared and noisy: compare ratios within one run, not absolute figures "
        "across runs.",
        "",
        "## Where we stand",
        "",
        where_we_stand(found, results),
        "",
        "## SPEC §7 targets",
        "",
    ]
    lines += render_targets(found)
    lines += ["", "## Every figure", ""]
    lines += render(results)
    lines += [
        "",
        "steady/s counts from the first tenth of the executions done to the last, as the peer "
        "harness does; processed/s includes worker start-up. A drain that outlasts "
        "`--drain-timeout` ends there (done < n) and its rates count what was done. Every "
        "store is recreated empty for each row. Latency: one execution at a time with pauses, "
        "from just before the call to the attempt's `started_at` (the store's clock) and to "
        "the function's own `time.time()`; all on one machine's clock.",
        "",
    ]
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
