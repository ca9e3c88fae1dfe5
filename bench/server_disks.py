#!/usr/bin/env python3
"""Commit and cold mount through ``stickyci serve``: this checkout against an earlier revision.

A runner whose store is a stickyci server pays for what the server does with each upload
(verifying every pack index against its pack, checking every ref it accepts) and with each
download (filtering what a scoped token may read). This benchmark puts a number on that: for
each run it starts, side by side and interleaved, the server of this checkout and the server
of ``--baseline`` (a git revision, extracted with ``git archive`` into the work dir), each over
a fresh ``file://`` store, and through each one, with a token scoped to ``bench-*`` as a fork's
pull request would have:

- commits the generated tree of ``bench/disks.py`` to a new disk (``stickyci disk commit`` of
  an overlay mount into which the tree was copied; the copy is not timed), and
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
import datetime
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import disks as base  # noqa: E402  (bench/disks.py)

KEY = "bench-disk"
COMMIT, MOUNT = "commit", "cold mount"
TAR = "tar | zstd -T0 -3 / zstd -d | tar -x"
log = base.log


@dataclass
class Revision:
    """A stickyci source tree whose CLI and server are measured."""

    label: str
    src: Path

    def environ(self, **extra: str) -> dict[str, str]:
        """The environment that runs this revision's ``stickyci``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("STICKYCI_")}
        return {**env, "PYTHONPATH": str(self.src), **extra}

    def cli(self, *args: str) -> list[str]:
        """``stickyci ARGS`` of this revision."""
        return [sys.executable, "-m", "stickyci", *args]


@dataclass
class Rows:
    """Seconds per (operation, tool), one entry per run."""

    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, op: str, tool: str, secs: float) -> None:
        """Record one measurement."""
        self.seconds.setdefault((op, tool), []).append(secs)
        log(f"  {op:12} {tool:40} {secs:7.3f} s  (other CPU {base.WATCH.other_share:.0%})")

    def median(self, op: str, tool: str) -> float | None:
        """The median of a row, if it was measured."""
        got = self.seconds.get((op, tool))
        return statistics.median(got) if got else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(rev: Revision, root: Path) -> Iterator[tuple[str, str]]:
    """``stickyci serve`` of ``rev`` over a fresh store; yields its URL and a scoped token."""
    base.remove(root)
    state = root / "state"
    state.mkdir(parents=True)
    token = base.run(rev.cli("token", "create", "--state-dir", str(state), "--write", "bench-*"),
                     env=rev.environ()).stdout.decode().strip().split()[-1]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as out:
        proc = subprocess.Popen(
            rev.cli("serve", "--store", f"file://{root / 'store'}", "--listen",
                    f"127.0.0.1:{port}", "--state-dir", str(state), "--no-access-log"),
            env=rev.environ(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{rev.label}: stickyci serve did not start: "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.05)  # polling a condition with a deadline
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerDisksBench:
    """Every measurement of one invocation."""

    def __init__(self, args: argparse.Namespace, ds: base.Dataset, work: Path,
                 revisions: list[Revision]) -> None:
        self.args = args
        self.ds = ds
        self.run_dir = work / "server-disks-run"
        self.revisions = revisions
        self.rows = Rows()

    def measure(self, op: str, tool: str, argv: list[str], env: dict[str, str]) -> None:
        """Time one command (once: a commit cannot be repeated on the same mount)."""
        self.rows.add(op, tool, base.timed(argv, env=env))

    def stickyci(self, rev: Revision) -> None:
        """Commit the tree through ``rev``'s server, then mount it cold."""
        root = self.run_dir / rev.label
        mnt, target = self.run_dir / "mnt", self.run_dir / "target"
        with serving(rev, root / "server") as (url, token):
            for i, (path, cache) in enumerate(((mnt, "cache-commit"), (target, "cache-mount"))):
                base.remove(path)
                path.mkdir(parents=True)
                env = rev.environ(STICKYCI_STORE=url, STICKYCI_TOKEN=token,
                                  STICKYCI_CACHE_DIR=str(root / cache))
                if i == 0:
                    base.run(rev.cli("disk", "mount", KEY, str(mnt), "--strategy", "overlay"),
                             env=env)
                    base.run(["cp", "-a", f"{self.ds.root}/.", f"{mnt}/"])
                    base.read_tree(mnt)
                    os.sync()
                    since = time.perf_counter()
                    self.measure(COMMIT, rev.label, rev.cli("disk", "commit", str(mnt)), env)
                    base.settle(root / cache, since)  # the upper dir is deleted in the background
                else:
                    base.drop_caches()
                    self.measure(MOUNT, rev.label, rev.cli("disk", "mount", KEY, str(target),
                                                           "--strategy", "overlay"), env)
                    got = base.TreeStats.of(target)
                    if (got.files, got.bytes) != (self.ds.stats.files, self.ds.stats.bytes):
                        raise RuntimeError(f"{rev.label} restored {got.summary()}")
                    base.run(rev.cli("disk", "unmount", str(target)), env=env)
        base.unmount_leftovers(self.run_dir)
        base.remove(root)

    def tar(self) -> None:
        """The reference: the tree through ``tar | zstd`` and back."""
        archive, target = self.run_dir / "tree.tar.zst", self.run_dir / "tar-target"
        base.read_tree(self.ds.root)
        self.measure(COMMIT, TAR, ["bash", "-o", "pipefail", "-c",
                                   f"tar -C {shlex.quote(str(self.ds.root))} -cf - . | zstd "
                                   f"-T0 -3 -q -f -o {shlex.quote(str(archive))}"],
                     dict(os.environ))
        base.remove(target)
        target.mkdir()
        base.drop_caches()
        self.measure(MOUNT, TAR, ["bash", "-o", "pipefail", "-c",
                                  f"zstd -d -q -c {shlex.quote(str(archive))} | tar -x -C "
                                  f"{shlex.quote(str(target))}"], dict(os.environ))
        base.remove(target)
        archive.unlink()

    def run(self) -> None:
        """Interleave the revisions (and tar) in every run."""
        base.unmount_leftovers(self.run_dir)
        base.remove(self.run_dir)
        self.run_dir.mkdir(parents=True)
        try:
            for i in range(self.args.runs):
                log(f"== run {i + 1}/{self.args.runs}")
                order = self.revisions if i % 2 == 0 else self.revisions[::-1]
                for rev in order:
                    self.stickyci(rev)
                self.tar()
        finally:
            base.unmount_leftovers(self.run_dir)
            base.remove(self.run_dir)

    def report(self, command: str, started: str) -> str:
        """The Markdown section."""
        m = base.machine()
        this, *others = self.revisions
        lines = [
            "## Commit and cold mount through `stickyci serve`", "",
            f"Command: `{command}`, started {started} UTC, medians of {self.args.runs}. Data "
            f"set: {self.ds.title}, {self.ds.stats.summary()}. Machine: {m['cpu']}, "
            f"{m['nproc']} CPUs, {m['ram']}, kernel {m['kernel']}, Python {m['python']}. "
            f"This checkout: {base.stickyci_revision()}.", "",
            "Each stickyci row runs that revision's server over a fresh `file://` store and its "
            "CLI with a token scoped to `bench-*` (`--write`), the local read tier on, overlay "
            "mounts; the cold mount starts from an empty cache dir with the page cache "
            "dropped. Revisions alternate order from run to run.", "",
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


def baseline_tree(work: Path, rev: str) -> Revision:
    """``git archive`` of ``rev``'s ``src/`` into the work dir (cached by commit)."""
    repo = str(HERE.parent)
    commit = base.run(["git", "-C", repo, "rev-parse", "--short", rev]).stdout.decode().strip()
    dest = work / "revisions" / commit
    if not (dest / "src" / "stickyci").is_dir():
        base.remove(dest)
        dest.mkdir(parents=True)
        base.run(f"git -C {shlex.quote(repo)} archive {shlex.quote(commit)} src "
                 f"| tar -x -C {shlex.quote(str(dest))}")
    return Revision(commit, dest / "src")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="HEAD",
                   help="git revision to compare with (default HEAD)")
    p.add_argument("--candidate", metavar="REV",
                   help="git revision to measure instead of this checkout's src/")
    p.add_argument("--scale", type=float, default=1.0,
                   help="file counts of the generated tree (1.0: ~1 GB, ~33k files)")
    p.add_argument("--seed", type=int, default=42, help="seed of the generated tree")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--work-dir", type=Path, default=base.DEFAULT_WORK,
                   help=f"cached data sets and scratch space (default {base.DEFAULT_WORK})")
    p.add_argument("--write", type=Path, metavar="MD",
                   help="write/replace this section in a Markdown file")
    base.add_noise_options(p)
    args = p.parse_args(argv)
    if args.runs < 1 or args.scale <= 0:
        p.error("--runs must be >= 1 and --scale > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("this benchmark needs root: overlay mounts and dropping the page cache")
        return 2
    if shutil.which("zstd") is None:
        log("zstd is not installed (apt-get install zstd)")
        return 2
    command = "python3 " + shlex.join(sys.argv if argv is None
                                      else ["bench/server_disks.py", *argv])
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    work = args.work_dir.resolve()
    this = (baseline_tree(work, args.candidate) if args.candidate
            else Revision("this checkout", HERE.parent / "src"))
    revisions = [this, baseline_tree(work, args.baseline)]
    dataset = base.generated_dataset(work, args.seed, args.scale)
    log(f"data set {dataset.key}: {dataset.stats.summary()}")
    base.WATCH.quiet_wait = args.quiet_wait
    bench = ServerDisksBench(args, dataset, work, revisions)
    bench.run()
    section = bench.report(command, started)
    print(section)
    if args.write:
        base.write_docs(args.write, "server-disks", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
