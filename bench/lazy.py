#!/usr/bin/env python3
"""Lazy against eager cold mounts: time to the first byte, a job reading 10% of the tree, and a
job reading all of it, on a fresh machine (empty base cache, page cache dropped).

A benchmark, not a test. The data set is committed once to a ``file://`` store under the work
dir; then, for each run, each store (that ``file://`` store, and the same store through
``stickyci serve`` with a read-only token) and each strategy (``overlay``: today's eager
restore, ``lazy``), a new cache dir stands for a fresh runner. ``zstd -d | tar -x`` of the
same tree (a local archive, as actions/cache restores it) is the reference row. The lazy
mount's skeleton is also timed alone, in this process from the snapshot's manifest, against
its floor: GNU ``tar -x`` of an archive of the same placeholders (sparse, no data)::

    python3 bench/lazy.py --scale 0.1 --runs 1                 # smoke run (~100 MB tree)
    python3 bench/lazy.py --runs 3 --write docs/benchmarks.md  # 1 GB generated tree
    python3 bench/lazy.py --dataset real --runs 3 --write docs/benchmarks.md

It needs root (overlay mounts, fanotify, dropping the page cache). The Markdown report goes to
stdout, progress to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from harness import cli
from harness.datasets import Dataset, generated_dataset, real_dataset
from harness.fs import (
    can_make_filesystems,
    drop_caches,
    remove,
    restore_root,
    unmount_leftovers,
    walk,
)
from harness.machine import machine, stickyci_revision
from harness.noise import WATCH
from harness.proc import create_token, free_port, log, run, started, wait_http
from harness.report import ratio, secs, write_section

from stickyci import fanotify
from stickyci.digest import Digest
from stickyci.disks.strategies.lazy import skeleton
from stickyci.snapshot import FILE as FILE_KIND
from stickyci.snapshot import Manifest, load_manifest
from stickyci.store import ObjectStore, open_backend

KEY = "lazy-bench"
EAGER, LAZY, TAR = "eager", "lazy", "tar"
STRATEGY = {EAGER: "overlay", LAZY: "lazy"}
FILE, SERVE = "file://", "stickyci serve"
JOBS = ("first byte", "10% of the bytes", "every file")
SKELETON, PLACEHOLDERS = "skeleton", "skeleton.tar"
FILLER_LOG = "filler.log"  # in a lazy mount's record dir
Result = tuple[float, float, float]  # first byte, whole job (s), other processes' CPU share


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


def _cold(cache: Path, store: str, token: str = "") -> dict[str, str]:
    remove(cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STICKYCI_")}
    return {**env, "STICKYCI_STORE": store, "STICKYCI_CACHE_DIR": str(cache),
            **({"STICKYCI_TOKEN": token} if token else {})}


def _timed_reads(start_job: Sequence[str], root: Path, reads: list[str],
                 env: dict[str, str] | None = None) -> Result:
    """Run ``start_job`` (a mount or an extraction), then read ``reads`` under ``root``;
    seconds from the start to the first byte of the first file and to the end."""
    drop_caches()
    start = WATCH.begin()
    run(list(start_job), env=env)
    with open(root / reads[0], "rb") as f:
        f.read(1)
    first = time.perf_counter() - start
    for rel in reads:
        _read(root / rel)
    job = WATCH.end() - start
    return first, job, WATCH.other_share


@contextlib.contextmanager
def _serving(run_dir: Path, store: Path) -> Iterator[tuple[str, str]]:
    """``stickyci serve`` over ``store``; its URL and a token that may read the disk."""
    state = run_dir / "server"
    remove(state)
    state.mkdir(parents=True)
    token = create_token(state, "--read", f"{KEY}*")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "stickyci", "serve", "--store", f"file://{store}",
           "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--no-access-log"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STICKYCI_")}
    with started([cmd], state / "server.log", env=env) as procs:
        wait_http(f"{url}/healthz", procs, state / "server.log")
        WATCH.ours = [p.pid for p in procs]
        try:
            yield url, token
        finally:
            WATCH.ours = ()


class LazyBench:
    """Every measurement of one invocation."""

    def __init__(self, ds: Dataset, run_dir: Path, seed: int) -> None:
        self.ds, self.run_dir = ds, run_dir
        self.store = run_dir / "store"
        self.ws = run_dir / "ws"
        files = _files(ds.root)
        self.jobs = {JOBS[0]: [files[0][0]], JOBS[1]: _tenth(files, seed),
                     JOBS[2]: [rel for rel, _ in files]}
        self.results: dict[tuple[str, str, str], list[Result]] = {}
        self.manifest = Manifest()  # the committed snapshot's, once seeded

    def seed(self) -> None:
        """Commit the data set to the ``file://`` store, and make the tar archive."""
        env = _cold(self.run_dir / "caches" / "seed", f"file://{self.store}")
        log(f"committing {self.ds.root} to {self.store}")
        _stickyci(env, "disk", "mount", KEY, str(self.ws), "--strategy", "copy")
        run(["cp", "-a", f"{self.ds.root}/.", f"{self.ws}/"])
        _stickyci(env, "disk", "commit", str(self.ws))
        remove(self.run_dir / "caches")
        run(["bash", "-o", "pipefail", "-c",
             f"tar -C {shlex.quote(str(self.ds.root))} -cf - . | zstd -T0 -3 -q -f -o "
             f"{shlex.quote(str(self.run_dir / 'tree.tar.zst'))}"])
        objects = ObjectStore(open_backend(f"file://{self.store}"))
        snapshot = json.loads(subprocess.run(
            [sys.executable, "-m", "stickyci", "disk", "show", KEY, "--json"], env=env,
            check=True, capture_output=True).stdout)["generations"][-1]["snapshot"]
        self.manifest = load_manifest(objects, Digest.parse(snapshot))
        target = self.run_dir / SKELETON
        self._skeleton(target)
        run(["tar", "-C", str(target), "--sparse", "-cf", str(self.run_dir / PLACEHOLDERS), "."])
        remove(target)

    def add(self, job: str, source: str, tool: str, got: Result) -> None:
        """Record one measurement."""
        self.results.setdefault((job, source, tool), []).append(got)
        log(f"  {job:17} {source:15} {tool:6} first byte {secs(got[0])} s, job "
            f"{secs(got[1])} s (other CPU {got[2]:.0%})")

    def root(self) -> contextlib.AbstractContextManager[Path]:
        """Where one measurement creates its tree (a base cache, an extraction): a new
        filesystem where one can be made, so none pays for the inodes the one before freed
        (``harness.fs.restore_root``)."""
        return restore_root(self.run_dir, 2 * self.ds.stats.bytes + 2**30,
                            fresh=can_make_filesystems())

    def stickyci(self, i: int, source: str, store_url: str, token: str) -> None:
        """Every job, eager then lazy (lazy then eager on odd runs), from one store."""
        order = (EAGER, LAZY) if i % 2 == 0 else (LAZY, EAGER)
        for job, reads in self.jobs.items():
            for tool in order:
                with self.root() as root:
                    cache = root / "cache"
                    env = _cold(cache, store_url, token)
                    mount = [sys.executable, "-m", "stickyci", "disk", "mount", KEY,
                             str(self.ws), "--strategy", STRATEGY[tool]]
                    try:
                        self.add(job, source, tool, _timed_reads(mount, self.ws, reads, env))
                    except OSError:
                        for path in cache.glob(f"mounts/*/{FILLER_LOG}"):
                            log(f"  {path}:\n{path.read_text()[-3000:]}")
                        raise
                    _stickyci(env, "disk", "unmount", str(self.ws))

    def _skeleton(self, target: Path) -> None:
        target.mkdir(parents=True)
        group = fanotify.init()
        try:
            for fd in skeleton(self.manifest, str(target), group, False).values():
                os.close(fd)
        finally:
            os.close(group)

    def skeletons(self, i: int) -> None:
        """The lazy skeleton alone against GNU tar extracting the same placeholders, each on a
        filesystem of its own (nothing read, so the page cache is not dropped)."""
        for tool in (LAZY, TAR) if i % 2 == 0 else (TAR, LAZY):
            with self.root() as root:
                target = root / SKELETON
                if tool == TAR:
                    target.mkdir()
                os.sync()
                start = WATCH.begin()
                if tool == LAZY:
                    self._skeleton(target)
                else:
                    run(["tar", "-C", str(target), "-xf", str(self.run_dir / PLACEHOLDERS)])
                took = WATCH.end() - start
                self.add(SKELETON, "", tool, (took, took, WATCH.other_share))

    def tar(self) -> None:
        """The reference: extract the whole archive, then read."""
        for job, reads in self.jobs.items():
            with self.root() as target:
                got = _timed_reads(["bash", "-o", "pipefail", "-c",
                                    "zstd -d -q -c "
                                    f"{shlex.quote(str(self.run_dir / 'tree.tar.zst'))}"
                                    f" | tar -x -C {shlex.quote(str(target))}"], target, reads)
                self.add(job, "local archive", TAR, got)

    def run(self, runs: int) -> None:
        """Seed, then ``runs`` rounds of every job from both stores and from the archive."""
        self.seed()
        for i in range(runs):
            log(f"== run {i + 1}/{runs}")
            self.stickyci(i, FILE, f"file://{self.store}", "")
            with _serving(self.run_dir, self.store) as (url, token):
                self.stickyci(i, SERVE, url, token)
            self.tar()
            self.skeletons(i)

    def median(self, job: str, source: str, tool: str, which: int) -> float:
        """The median of one figure of a row."""
        return statistics.median(r[which] for r in self.results[(job, source, tool)])

    def report(self, command: str, started: str, runs: int) -> str:
        """The Markdown section."""
        m = machine()
        noisiest = max(r[2] for rs in self.results.values() for r in rs)
        lines = [
            f"### Lazy cold mounts: {self.ds.title}", "",
            f"Command: `{command}`, started {started} UTC, medians of {runs}. Data set: "
            f"{self.ds.stats.summary()}. Machine: {m['cpu']}, {m['nproc']} CPUs, {m['ram']}, "
            f"kernel {m['kernel']}, Python {m['python']}. This checkout: "
            f"{stickyci_revision()}. Other processes used at most {noisiest:.0%} of the CPUs "
            "during a measurement (a shared machine).", "",
            "Every mount starts on an empty base cache with the page cache dropped"
            + (", on a new ext4 filesystem (a loop device, the work dir's journal setting), as "
               "does every extraction, so none pays for the inodes the one before it freed"
               if can_make_filesystems() else "") + "; the times "
            "run from the start of `stickyci disk mount` (process start-up included) to the "
            "first byte of the first file read and to the end of the job. Eager is today's "
            "`--strategy overlay` cold mount, which restores the whole base first. The "
            "`tar` row extracts a local `tar | zstd -3` archive of the tree, then reads.", "",
            "| job | store | eager: first byte | lazy: first byte | eager: job | lazy: job "
            "| eager / lazy |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for job in self.jobs:
            for source in (FILE, SERVE):
                e1, l1 = (self.median(job, source, t, 0) for t in (EAGER, LAZY))
                ej, lj = (self.median(job, source, t, 1) for t in (EAGER, LAZY))
                lines.append(f"| {job} | `{source}` | {secs(e1)} s | {secs(l1)} s | "
                             f"{secs(ej)} s | {secs(lj)} s | {ratio(ej, lj)} |")
            t1, tj = (self.median(job, "local archive", TAR, k) for k in (0, 1))
            lines.append(f"| {job} | tar (local archive) | {secs(t1)} s | — | {secs(tj)} s | "
                         "— | — |")
        files = sum(e.kind == FILE_KIND for e in self.manifest.entries.values())
        ours, floor = (self.median(SKELETON, "", t, 1) for t in (LAZY, TAR))
        lines += ["", f"The skeleton alone ({files:,} placeholders and the tree's directories, "
                  "links and metadata), written to a filesystem of its own as above: the lazy "
                  "mount's, in one process from the manifest, and GNU `tar -x` of an archive of "
                  "the same placeholders (its floor: the kernel's cost of creating them).", "",
                  "| skeleton | lazy (stickyci) | `tar -x` of the placeholders | lazy / tar |",
                  "| --- | ---: | ---: | ---: |",
                  f"| {files:,} files | {secs(ours)} s | {secs(floor)} s | "
                  f"{ratio(ours, floor)} |"]
        return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the report."""
    p = cli.parser(__doc__ or "")
    cli.add_tree_options(p, write="the lazy section", seed="seed of the generated tree")
    p.add_argument("--dataset", choices=("generated", "real"), default="generated")
    p.add_argument("--real-tree", help="the real tree to copy (default: the Rust toolchain)")
    p.add_argument("--keep", action="store_true", help="keep the run dir (store, caches)")
    args = cli.parse_tree_args(p, argv)
    if not cli.preflight("zstd", "tar"):
        return 2
    WATCH.quiet_wait = args.quiet_wait
    work: Path = args.work_dir
    ds: Dataset = (real_dataset(work, args.real_tree) if args.dataset == "real"
                   else generated_dataset(work, args.seed, args.scale))
    started_at = cli.started_at()
    run_dir = work / "run-lazy"
    unmount_leftovers(run_dir)
    remove(run_dir)
    bench = LazyBench(ds, run_dir, args.seed)
    try:
        bench.run(args.runs)
    finally:
        unmount_leftovers(run_dir)
        if not args.keep:
            remove(run_dir)
    section = bench.report(cli.command_line("bench/lazy.py", argv), started_at, args.runs)
    print(section)
    if args.write:
        write_section(args.write, f"lazy-{ds.key}", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
