#!/usr/bin/env python3
"""Lazy against eager cold mounts: time to the first byte, a job reading 10% of the tree, and a
job reading all of it, on a fresh machine (empty base cache, page cache dropped).

A benchmark, not a test. The data set is committed once to a ``file://`` store under the work
dir; then, for each run and each strategy (``overlay``: today's eager restore, ``lazy``), a new
cache dir stands for a fresh runner::

    python3 bench/lazy.py --scale 0.1 --runs 1                 # smoke run (~100 MB tree)
    python3 bench/lazy.py --runs 3 --write docs/benchmarks.md  # 1 GB generated tree
    python3 bench/lazy.py --dataset real --runs 3 --write docs/benchmarks.md

It needs root (overlay mounts, fanotify, dropping the page cache). The Markdown report goes to
stdout, progress to stderr.
"""

from __future__ import annotations

import os
import random
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import cli
from harness.datasets import Dataset, generated_dataset, real_dataset
from harness.fs import drop_caches, remove, unmount_leftovers, walk
from harness.proc import log
from harness.report import ratio, secs, write_section

KEY = "lazy-bench"
STRATEGIES = ("overlay", "lazy")


def _stickyci(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "stickyci", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def _read(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def _files(root: Path) -> list[tuple[str, int]]:
    return sorted((rel, st.st_size) for rel, st in walk(root)
                  if stat.S_ISREG(st.st_mode) and st.st_size)


def _tenth(files: list[tuple[str, int]], seed: int) -> list[str]:
    """Files picked at random until they hold 10% of the bytes."""
    rng = random.Random(seed)
    picked, total, goal = [], 0, sum(n for _, n in files) / 10
    for rel, n in rng.sample(files, len(files)):
        if total >= goal:
            break
        picked.append(rel)
        total += n
    return picked


def _cold(work: Path, store: Path, name: str) -> dict[str, str]:
    cache = work / "caches" / name
    remove(cache)
    return {**os.environ, "STICKYCI_STORE": f"file://{store}", "STICKYCI_CACHE_DIR": str(cache)}


def _job(env: dict[str, str], ws: Path, strategy: str, reads: list[str]) -> tuple[float, float]:
    """Mount, read ``reads`` (the first byte of the first is noted), unmount; (first byte,
    whole job) in seconds from the start of the mount."""
    drop_caches()
    start = time.perf_counter()
    _stickyci(env, "disk", "mount", KEY, str(ws), "--strategy", strategy)
    with open(ws / reads[0], "rb") as f:
        f.read(1)
    first = time.perf_counter() - start
    for rel in reads:
        _read(ws / rel)
    job = time.perf_counter() - start
    _stickyci(env, "disk", "unmount", str(ws))
    return first, job


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the report."""
    p = cli.parser(__doc__ or "")
    cli.add_tree_options(p, write="the lazy section", seed="seed of the generated tree")
    p.add_argument("--dataset", choices=("generated", "real"), default="generated")
    p.add_argument("--real-tree", help="the real tree to copy (default: the Rust toolchain)")
    p.add_argument("--keep", action="store_true", help="keep the run dir (store, caches)")
    args = cli.parse_tree_args(p, argv)
    if not cli.preflight():
        return 2
    work: Path = args.work_dir
    ds: Dataset = (real_dataset(work, args.real_tree) if args.dataset == "real"
                   else generated_dataset(work, args.seed, args.scale))
    run_dir = work / "run-lazy"
    unmount_leftovers(run_dir)
    remove(run_dir)
    store = run_dir / "store"
    seed_env = _cold(run_dir, store, "seed")
    ws = run_dir / "ws"
    log(f"committing {ds.root} to {store}")
    _stickyci(seed_env, "disk", "mount", KEY, str(ws), "--strategy", "copy")
    subprocess.run(["cp", "-a", f"{ds.root}/.", f"{ws}/"], check=True)
    _stickyci(seed_env, "disk", "commit", str(ws))
    files = _files(ds.root)
    jobs = {"first byte": [files[0][0]], "10% of the bytes": _tenth(files, args.seed),
            "every file": [rel for rel, _ in files]}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for i in range(args.runs):
            for job, reads in jobs.items():
                for strategy in STRATEGIES:
                    env = _cold(run_dir, store, f"{strategy}-{i}")
                    got = _job(env, ws, strategy, reads)
                    log(f"run {i + 1}: {strategy:7} {job}: first byte {secs(got[0])}, "
                        f"job {secs(got[1])}")
                    results.setdefault((job, strategy), []).append(got)
    finally:
        unmount_leftovers(run_dir)
        if not args.keep:
            remove(run_dir)
    lines = [f"### Lazy cold mounts: {ds.title}", "",
             f"`{cli.command_line('bench/lazy.py', argv)}`; {ds.stats.summary()}; medians of "
             f"{args.runs}, page cache dropped before each mount, every mount on an empty "
             "base cache.", "",
             "| job | eager: first byte | lazy: first byte | eager: job | lazy: job | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for job in jobs:
        eager, lazy = results[(job, "overlay")], results[(job, "lazy")]
        e1, l1 = (statistics.median(r[0] for r in x) for x in (eager, lazy))
        ej, lj = (statistics.median(r[1] for r in x) for x in (eager, lazy))
        lines.append(f"| {job} | {secs(e1)} | {secs(l1)} | {secs(ej)} | {secs(lj)} | "
                     f"{ratio(ej, lj)} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        write_section(args.write, f"lazy-{ds.key}", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
