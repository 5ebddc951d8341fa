"""Running the shared peer harness (bench/peers/run.py of the shared tree) and reading its
output: one line per system with enqueue/s, processed/s and steady/s."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LINE = re.compile(
    r"^(?P<system>\S+)\s+n=(?P<n>\d+)\s+enqueue/s=\s*(?P<enqueue>[\d.]+)"
    r"\s+processed/s=\s*(?P<processed>[\d.]+)\s+steady/s=\s*(?P<steady>[\d.]+)"
    r"\s+done=(?P<done>\d+)"
)

DESCRIPTIONS = {
    "dramatiq": ("dramatiq (2 procs x 8 threads)", "Redis"),
    "huey_redis": ("huey (4 threads)", "Redis"),
    "huey_sqlite": ("huey (4 threads)", "SQLite"),
    "saq": ("saq (2 workers)", "Redis"),
    "celery": ("celery (prefork 2)", "Redis"),
    "procrastinate": ("procrastinate (concurrency 10)", "PostgreSQL"),
    "rq": ("rq (worker-pool 2)", "Redis"),
    "arq": ("arq (max_jobs 10)", "Redis"),
}


@dataclass
class PeerResult:
    system: str
    n: int
    enqueue: float
    processed: float
    steady: float
    done: int

    @property
    def label(self) -> str:
        return DESCRIPTIONS.get(self.system, (self.system, "?"))[0]

    @property
    def broker(self) -> str:
        return DESCRIPTIONS.get(self.system, (self.system, "?"))[1]


def run_harness(
    harness: Path, venv: Path, n: int, systems: list[str], pg_env: dict[str, str]
) -> list[PeerResult]:
    """Run the harness with a peers venv's python; its console commands (celery, dramatiq,
    procrastinate, ...) are found on that venv's bin directory."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"  no python in {venv}: skipping {' '.join(systems)}", file=sys.stderr)
        return []
    env = dict(os.environ, **pg_env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    command = [str(python), str(harness / "run.py"), str(n), *systems]
    process = subprocess.Popen(
        command, cwd=harness, env=env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    results = []
    assert process.stdout is not None
    for line in process.stdout:
        match = LINE.match(line.strip())
        if match:
            print(f"  {line.rstrip()}", flush=True)
            results.append(_result(match))
    if process.wait() != 0:
        print(f"  peer harness exited with {process.returncode}", file=sys.stderr)
    return results


def _result(match: re.Match[str]) -> PeerResult:
    return PeerResult(
        system=match["system"],
        n=int(match["n"]),
        enqueue=float(match["enqueue"]),
        processed=float(match["processed"]),
        steady=float(match["steady"]),
        done=int(match["done"]),
    )
