"""Pipeline runner benchmarks: scheduler overhead per job, and the example's cold vs warm runs.

    python3 bench/pipeline.py [--jobs 200] [--runs 3] [--write docs/benchmarks.md]

1. Overhead: one fan-out of N no-op jobs (`true`) through `stickyci run`, against the same N
   commands started directly (all at once, as the fan-out does) from Python; the difference
   over N is the scheduler's cost per job.
2. The canonical example (`examples/monorepo/pipeline.yml`) through `stickyci bench`: cold and
   warm runs alternated, per-job medians, and the warm/cold ratio of the total.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.datasets import EXAMPLE_PIPELINE as EXAMPLE
from harness.proc import stickyci
from harness.report import write_section

KEY = "pipeline"


def direct(n: int) -> float:
    """Start ``n`` ``bash -eo pipefail -c true`` at once and wait for all of them."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["bash", "-eo", "pipefail", "-c", "true"]) for _ in range(n)]
    for p in procs:
        p.wait()
    return time.perf_counter() - start


def overhead(n: int, runs: int, env: dict[str, str], work: Path) -> dict[str, float]:
    """Median wall time of the fan-out through stickyci and directly, and the cost per job."""
    pipeline = work / "fanout.yml"
    pipeline.write_text("name: fanout\njobs:\n  noop:\n    matrix: {axes: {n: "
                        f"{list(range(n))}}}}}\n    steps: [{{run: 'true'}}]\n")
    through, plain = [], []
    for _ in range(runs):
        start = time.perf_counter()
        record = json.loads(stickyci("run", str(pipeline), "--json", "--sha", "x",
                                     env=env).stdout)
        through.append(time.perf_counter() - start)
        assert len(record["jobs"]) == n and record["state"] == "success"
        plain.append(direct(n))
    t, d = statistics.median(through), statistics.median(plain)
    return {"stickyci": t, "direct": d, "per_job_ms": (t - d) / n * 1000}


def example(runs: int, env: dict[str, str]) -> dict[str, object]:
    """``stickyci bench`` on the canonical example."""
    doc: dict[str, object] = json.loads(stickyci("bench", str(EXAMPLE), "--runs", str(runs),
                                                 "--sha", "bench", "--json", env=env).stdout)
    return doc


def markdown(n: int, runs: int, over: dict[str, float], ex: dict[str, object],
             command: str) -> str:
    """The results as a Markdown section."""
    rows = ex["rows"]
    assert isinstance(rows, list)
    total = next(r for r in rows if r["job"] == "total")
    lines = ["## Pipeline runner", "",
             f"- **Command:** `{command}`",
             f"- **Machine:** {os.cpu_count()} CPUs, Linux {os.uname().release}; "
             f"**date** {time.strftime('%Y-%m-%d %H:%M')} (UTC); medians of {runs} runs.", "",
             f"### Scheduler overhead: {n} no-op jobs in one fan-out", "",
             "| | wall s | per job |", "|---|---:|---:|",
             f"| `stickyci run` | {over['stickyci']:.3f} | |",
             f"| the same commands started directly | {over['direct']:.3f} | |",
             f"| overhead | {over['stickyci'] - over['direct']:.3f} | "
             f"**{over['per_job_ms']:.1f} ms** (target <= 20 ms: "
             f"{'PASS' if over['per_job_ms'] <= 20 else 'MISS'}) |", "",
             "The stickyci figure includes its start-up, planning, the run directory, reports "
             "and the history write, once per run.", "",
             "### Canonical example, cold vs warm (`stickyci bench`)", "",
             "| job | cold s | warm s | warm / cold |", "|---|---:|---:|---:|"]
    lines += [f"| {r['job']} | {r['cold']:.2f} | {r['warm']:.2f} | {r['ratio']:.0%} |"
              for r in rows]
    lines += ["", f"Warm total is **{total['ratio']:.0%}** of cold (target <= 35%: "
              f"{'PASS' if total['ratio'] <= 0.35 else 'MISS'}). Cold runs start every disk "
              "empty (warm-deps compiles the 125 dependency objects); warm runs mount the "
              "committed disks and compile none."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run both benchmarks on a private store and cache."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        env = {**os.environ, "STICKYCI_CACHE_DIR": str(work / "cache"),
               "STICKYCI_STORE": f"file://{work / 'store'}"}
        over = overhead(args.jobs, args.runs, env, work)
        print(json.dumps(over))
        ex = example(args.runs, env)
        print(json.dumps(ex))
    command = "python3 bench/pipeline.py " + " ".join(sys.argv[1:])
    section = markdown(args.jobs, args.runs, over, ex, command.strip())
    print(section)
    if args.write:
        write_section(args.write, KEY, section)


if __name__ == "__main__":
    main()
