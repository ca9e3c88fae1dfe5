#!/usr/bin/env python3
"""Commit and cold mount through ``stickyci serve``: this checkout against an earlier revision.

A runner whose store is a stickyci server pays for what the server does with each upload
(verifying every pack index against its pack, checking every ref it accepts) and with each
download (filtering what a scoped token may read). This benchmark puts a number on that: for
each run it starts, side by side and interleaved, the server of this checkout and the server
of ``--baseline`` (a git revision, extracted with ``git archive`` into the work dir), each over
a fresh ``file://`` store, and through each one, with a token scoped to ``bench-*`` as a fork's
pull request would have:

- commits the generated tree (``bench/harness/datasets.py``, as ``bench/disks.py`` uses it) to
  a new disk (``stickyci disk commit`` of an overlay mount into which the tree was copied; the
  copy is not timed), and
- mounts it from an empty cache dir with the page cache dropped (a cold mount).

``tar | zstd -T0 -3`` and its extraction, on the same tree, are the reference rows, as
actions/cache does it::

    python3 bench/server_disks.py --scale 0.1 --runs 1                  # smoke run
    python3 bench/server_disks.py --runs 3 --write docs/benchmarks.md   # the 1 GB tree

It needs root (overlay mounts, dropping the page cache). The Markdown report goes to stdout,
progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import cli
from harness.datasets import Dataset, TreeStats, generated_dataset
from harness.fs import (
    can_make_filesystems,
    drop_caches,
    read_tree,
    remove,
    restore_root,
    settle,
    unmount_leftovers,
)
from harness.machine import machine, stickyci_revision
from harness.noise import WATCH, timed
from harness.proc import free_port, log, run, started, wait_http
from harness.report import write_section
from harness.revisions import THIS, Revision, revision_tree

KEY = "bench-disk"
COMMIT, MOUNT = "commit", "cold mount"
TAR = "tar | zstd -T0 -3 / zstd -d | tar -x"


@dataclass
class Rows:
    """Seconds per (operation, tool), one entry per run."""

    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, op: str, tool: str, secs: float) -> None:
        """Record one measurement."""
        self.seconds.setdefault((op, tool), []).append(secs)
        log(f"  {op:12} {tool:40} {secs:7.3f} s  (other CPU {WATCH.other_share:.0%})")

    def median(self, op: str, tool: str) -> float | None:
        """The median of a row, if it was measured."""
        got = self.seconds.get((op, tool))
        return statistics.median(got) if got else None


@contextlib.contextmanager
def serving(rev: Revision, root: Path) -> Iterator[tuple[str, str]]:
    """``stickyci serve`` of ``rev`` over a fresh store; yields its URL and a scoped token."""
    remove(root)
    state = root / "state"
    state.mkdir(parents=True)
    token = run(rev.cli("token", "create", "--state-dir", str(state), "--write", "bench-*"),
                env=rev.environ()).stdout.decode().strip().split()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = rev.cli("serve", "--store", f"file://{root / 'store'}", "--listen",
                  f"127.0.0.1:{port}", "--state-dir", str(state), "--no-access-log")
    with started([cmd], root / "server.log", env=rev.environ()) as procs:
        wait_http(f"{url}/healthz", procs, root / "server.log")
        yield url, token


class ServerDisksBench:
    """Every measurement of one invocation."""

    def __init__(self, args: argparse.Namespace, ds: Dataset, work: Path,
                 revisions: list[Revision]) -> None:
        self.args = args
        self.ds = ds
        self.run_dir = work / "server-disks-run"
        self.revisions = revisions
        self.rows = Rows()

    def measure(self, op: str, tool: str, argv: list[str], env: dict[str, str]) -> None:
        """Time one command (once: a commit cannot be repeated on the same mount)."""
        self.rows.add(op, tool, timed(argv, env=env))

    def cold_root(self) -> contextlib.AbstractContextManager[Path]:
        """Where a cold mount or an extraction writes: a new filesystem where one can be
        made (``harness.fs.restore_root``)."""
        return restore_root(self.run_dir, 2 * self.ds.stats.bytes + 2**30,
                            fresh=can_make_filesystems())

    def stickyci(self, rev: Revision) -> None:
        """Commit the tree through ``rev``'s server, then mount it cold."""
        root = self.run_dir / rev.label
        mnt = self.run_dir / "mnt"
        with serving(rev, root / "server") as (url, token):
            def env(cache: Path) -> dict[str, str]:
                return rev.environ(STICKYCI_STORE=url, STICKYCI_TOKEN=token,
                                   STICKYCI_CACHE_DIR=str(cache))

            remove(mnt)
            mnt.mkdir(parents=True)
            run(rev.cli("disk", "mount", KEY, str(mnt), "--strategy", "overlay"),
                env=env(root / "cache-commit"))
            run(["cp", "-a", f"{self.ds.root}/.", f"{mnt}/"])
            read_tree(mnt)
            os.sync()
            since = time.perf_counter()
            self.measure(COMMIT, rev.label, rev.cli("disk", "commit", str(mnt)),
                         env(root / "cache-commit"))
            settle(root / "cache-commit", since)  # the upper dir is deleted in the background
            with self.cold_root() as cold:
                target = cold / "target"
                target.mkdir()
                drop_caches()
                self.measure(MOUNT, rev.label, rev.cli("disk", "mount", KEY, str(target),
                                                       "--strategy", "overlay"),
                             env(cold / "cache"))
                got = TreeStats.of(target)
                if (got.files, got.bytes) != (self.ds.stats.files, self.ds.stats.bytes):
                    raise RuntimeError(f"{rev.label} restored {got.summary()}")
                run(rev.cli("disk", "unmount", str(target)), env=env(cold / "cache"))
        unmount_leftovers(self.run_dir)
        remove(root)

    def tar(self) -> None:
        """The reference: the tree through ``tar | zstd`` and back."""
        archive = self.run_dir / "tree.tar.zst"
        read_tree(self.ds.root)
        self.measure(COMMIT, TAR, ["bash", "-o", "pipefail", "-c",
                                   f"tar -C {shlex.quote(str(self.ds.root))} -cf - . | zstd "
                                   f"-T0 -3 -q -f -o {shlex.quote(str(archive))}"],
                     dict(os.environ))
        with self.cold_root() as target:
            drop_caches()
            self.measure(MOUNT, TAR, ["bash", "-o", "pipefail", "-c",
                                      f"zstd -d -q -c {shlex.quote(str(archive))} | tar -x -C "
                                      f"{shlex.quote(str(target))}"], dict(os.environ))
        archive.unlink()

    def run(self) -> None:
        """Interleave the revisions (and tar) in every run."""
        unmount_leftovers(self.run_dir)
        remove(self.run_dir)
        self.run_dir.mkdir(parents=True)
        try:
            for i in range(self.args.runs):
                log(f"== run {i + 1}/{self.args.runs}")
                order = self.revisions if i % 2 == 0 else self.revisions[::-1]
                for rev in order:
                    self.stickyci(rev)
                self.tar()
        finally:
            unmount_leftovers(self.run_dir)
            remove(self.run_dir)

    def report(self, command: str, started: str) -> str:
        """The Markdown section."""
        m = machine()
        this, *others = self.revisions
        lines = [
            "## Commit and cold mount through `stickyci serve`", "",
            f"Command: `{command}`, started {started} UTC, medians of {self.args.runs}. Data "
            f"set: {self.ds.title}, {self.ds.stats.summary()}. Machine: {m['cpu']}, "
            f"{m['nproc']} CPUs, {m['ram']}, kernel {m['kernel']}, Python {m['python']}. "
            f"This checkout: {stickyci_revision()}.", "",
            "Each stickyci row runs that revision's server over a fresh `file://` store and its "
            "CLI with a token scoped to `bench-*` (`--write`), the local read tier on, overlay "
            "mounts; the cold mount starts from an empty cache dir with the page cache "
            "dropped" + (", on a new ext4 filesystem (a loop device, the work dir's journal "
                         "setting), as does the extraction" if can_make_filesystems() else "")
            + ". Revisions alternate order from run to run.", "",
            "| operation | " + " | ".join(r.label for r in self.revisions)
            + f" | {TAR.replace('|', chr(92) + '|')} | "
            + " | ".join(f"{this.label} / {o.label}" for o in others) + " |",
            "|---|" + "---:|" * (len(self.revisions) + 1 + len(others)),
        ]
        for op in (COMMIT, MOUNT):
            meds = [self.rows.median(op, r.label) for r in self.revisions]
            tar = self.rows.median(op, TAR)
            cells = [f"{x:.2f} s" if x is not None else "—" for x in [*meds, tar]]
            ratios = [f"{meds[0] / x:.2f}x" if meds[0] and x else "—" for x in meds[1:]]
            lines.append(f"| {op} | " + " | ".join(cells + ratios) + " |")
        return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = cli.parser(__doc__)
    p.add_argument("--baseline", default="HEAD",
                   help="git revision to compare with (default HEAD)")
    p.add_argument("--candidate", metavar="REV",
                   help="git revision to measure instead of this checkout's src/")
    cli.add_tree_options(p, write="this section", seed="seed of the generated tree")
    return cli.parse_tree_args(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    if not cli.preflight("zstd"):
        return 2
    command = cli.command_line("bench/server_disks.py", argv)
    started = cli.started_at()
    work = args.work_dir.resolve()
    this = (revision_tree(work, args.candidate) if args.candidate
            else THIS)
    revisions = [this, revision_tree(work, args.baseline)]
    dataset = generated_dataset(work, args.seed, args.scale)
    log(f"data set {dataset.key}: {dataset.stats.summary()}")
    WATCH.quiet_wait = args.quiet_wait
    bench = ServerDisksBench(args, dataset, work, revisions)
    bench.run()
    section = bench.report(command, started)
    print(section)
    if args.write:
        write_section(args.write, "server-disks", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
