#!/usr/bin/env python3
"""GitHub Actions cache: the real ``@actions/cache`` client through ``stickyci serve`` against
``tar | zstd`` to a local file (the floor).

Each round, interleaved (the order alternates from round to round):

- **stickyci**: a fresh ``stickyci serve`` over a ``file://`` store, a token scoped to
  ``bench-*`` as ``ACTIONS_RUNTIME_TOKEN``; the npm package ``@actions/cache`` under Node
  (``tests/gha_client/driver.js``, as ``tests/test_server_gha.py`` runs it) saves the 1 GB
  generated build tree (``bench/harness/datasets.py``) under a key, restores it into an empty
  workspace, then saves a second, slightly changed version under a second key (the change of
  ``bench/disks.py``'s incremental save: 1 KiB appended to every 100th file, the 42 MB binary
  replaced by 50 MiB of new bytes). Each is one ``node driver.js`` process, timed whole.
- **the floor**: what the client runs itself, minus the network and the server:
  ``tar --posix -cf - -C WS data | zstd -T0 --long=30`` to a local file, ``zstd -d --long=30 |
  tar -x`` back, and the second version archived again.

Bytes stored: the growth of stickyci's store (``du -sb``) for each version and the server's
own counters (``stickyci_gha_archive_bytes_total``: uploaded, content, new), against the size of
each archive file. Both sides read a tree already in the page cache and restore with the
archive or the store in the page cache::

    python3 bench/gha.py --scale 0.05 --runs 1                      # smoke run
    python3 bench/gha.py --runs 3 --write docs/benchmarks.md        # the 1 GB tree

Needs Node with ``npm ci --prefix tests/gha_client``, zstd and GNU tar. Progress goes to stderr, the
Markdown report to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from disks import ChangePlan
from harness import cli
from harness.datasets import Dataset, TreeStats, generated_dataset
from harness.fs import du_bytes, remove
from harness.machine import machine, stickyci_revision
from harness.noise import WATCH
from harness.proc import REPO, first_line, log, run, tests_helpers
from harness.profile import spying, top_inclusive, top_self
from harness.report import MB, ratio, write_section
from prometheus_client.parser import text_string_to_metric_families

KEY = "gha"
CLIENT = REPO / "tests" / "gha_client"
ST, FLOOR = "stickyci", "floor"
SAVE1, RESTORE1, SAVE2 = "save", "restore", "save, changed version"
OPS = (SAVE1, RESTORE1, SAVE2)
FLOOR_LABEL = "tar --posix \\| zstd -T0 --long=30 to a file / zstd -d \\| tar -x"


@dataclass
class Rows:
    """Seconds by (operation, side), bytes by (what, side); one entry per round."""

    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    other: list[float] = field(default_factory=list)
    size: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def add(self, op: str, side: str, secs: float) -> None:
        """Record one measurement."""
        self.seconds.setdefault((op, side), []).append(secs)
        self.other.append(WATCH.other_share)
        log(f"  {op:22} {side:9} {secs:7.2f} s  (other CPU {WATCH.other_share:.0%})")

    def note(self, what: str, side: str, n: int) -> None:
        """Record a byte count."""
        self.size.setdefault((what, side), []).append(n)
        log(f"  {what:22} {side:9} {n / MB:9.1f} MB")

    def med(self, op: str, side: str) -> float:
        """The median seconds of one row."""
        return statistics.median(self.seconds[(op, side)])

    def bytes(self, what: str, side: str) -> float:
        """The median of a byte count."""
        return statistics.median(self.size[(what, side)])


def stored(store: Path) -> int:
    """The bytes of a ``file://`` store (0 before anything was stored)."""
    return du_bytes(store) if store.exists() else 0


def metrics(url: str, token: str) -> dict[str, float]:
    """``stickyci_gha_archive_bytes_total`` by kind."""
    text = httpx2.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"},
                     timeout=30).raise_for_status().text
    return {s.labels["kind"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "stickyci_gha_archive_bytes_total"}


class GhaBench:
    """Every measurement of one invocation."""

    def __init__(self, args: argparse.Namespace, ds: Dataset, work: Path) -> None:
        self.args = args
        self.ds = ds
        self.run_dir = work / "gha-run"
        self.ws = self.run_dir / "ws"           # the saving job's workspace
        self.ws_restore = self.run_dir / "ws2"  # the restoring job's
        self.rows = Rows()
        self.plan: ChangePlan | None = None
        # operation -> (stickyci functions by inclusive share, functions by self share)
        self.profiles: dict[str, tuple[list[tuple[str, float]], list[tuple[str, float]]]] = {}

    def timed(self, op: str, side: str, argv: list[str], cwd: Path,
              env: dict[str, str] | None = None) -> str:
        """Run and time one command; its standard output."""
        start = WATCH.begin()
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                              check=False)
        self.rows.add(op, side, WATCH.end() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}:\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc.stdout

    def check_restored(self, side: str) -> None:
        """The restored tree holds what the data set holds (counted, not timed)."""
        got, want = TreeStats.of(self.ws_restore / "data"), self.ds.stats
        if (got.files, got.bytes, got.symlinks) != (want.files, want.bytes, want.symlinks):
            raise RuntimeError(f"{side} restored {got.summary()}; expected {want.summary()}")

    def client(self, op: str, url: str, token: str, cwd: Path, *args: str) -> object:
        """``node driver.js ARGS`` in ``cwd``, timed as ``op``: the client's result."""
        env = {"PATH": os.environ["PATH"], "HOME": str(self.run_dir / "home"),
               "ACTIONS_RESULTS_URL": url + "/", "ACTIONS_RUNTIME_TOKEN": token,
               "ACTIONS_CACHE_SERVICE_V2": "true", "RUNNER_TEMP": str(self.run_dir / "tmp")}
        out = self.timed(op, ST, ["node", str(CLIENT / "driver.js"), *args], cwd, env)
        last = out.strip().splitlines()[-1] if out.strip() else ""
        if not last.startswith("RESULT "):
            raise RuntimeError(f"the client printed no result:\n{out[-2000:]}")
        return json.loads(last.removeprefix("RESULT "))

    def stickyci(self) -> None:
        """Save, restore, save the changed version through a fresh server."""
        tests_helpers()
        from server import start_server

        assert self.plan is not None
        root = self.run_dir / "server"
        remove(root)
        with start_server(root, args=("--no-access-log",)) as server:
            WATCH.ours = [server.process.pid]
            token = server.token("--write", "bench-*")
            store = Path(server.store_url.removeprefix("file://"))
            before = stored(store)
            saved = self.client(SAVE1, server.url, token, self.ws, "save", "bench-v1",
                                "data")
            if not (isinstance(saved, int) and saved > 0):
                raise RuntimeError(f"the save failed: {saved}")
            first = metrics(server.url, server.admin)
            self.rows.note("stored, first version", ST, stored(store) - before)
            self.rows.note("archive uploaded", ST, int(first.get("uploaded", 0)))
            self.rows.note("new content, first", ST, int(first.get("new", 0)))

            remove(self.ws_restore / "data")
            got = self.client(RESTORE1, server.url, token, self.ws_restore, "restore",
                              "bench-v1", "data")
            if got != "bench-v1":
                raise RuntimeError(f"the restore found {got!r}")
            self.check_restored(ST)
            remove(self.ws_restore / "data")

            mid = stored(store)
            with self.plan.applied(self.ws / "data", self.run_dir / "backup"):
                saved = self.client(SAVE2, server.url, token, self.ws, "save", "bench-v2",
                                    "data")
            if not (isinstance(saved, int) and saved > 0):
                raise RuntimeError(f"the second save failed: {saved}")
            second = metrics(server.url, server.admin)
            self.rows.note("stored, second version", ST, stored(store) - mid)
            self.rows.note("new content, second", ST,
                           int(second.get("new", 0) - first.get("new", 0)))
            WATCH.ours = []
        remove(root)

    def profile(self) -> None:
        """Where the server spends its time: py-spy on it through one save and one restore
        (not timed)."""
        tests_helpers()
        from server import start_server

        root = self.run_dir / "server"
        remove(root)
        with start_server(root, args=("--no-access-log",)) as server:
            token = server.token("--write", "bench-*")
            for op, cwd, args in ((SAVE1, self.ws, ("save", "bench-v1", "data")),
                                  (RESTORE1, self.ws_restore, ("restore", "bench-v1", "data"))):
                remove(self.ws_restore / "data")
                raw = self.run_dir / f"profile-{args[0]}.txt"
                with spying(server.process.pid, raw):
                    self.client(f"{op} (profiled)", server.url, token, cwd, *args)
                self.profiles[op] = (top_inclusive(raw, 10, "stickyci/"), top_self(raw, 10))
            remove(self.ws_restore / "data")
        remove(root)

    def floor(self) -> None:
        """The same three operations as ``tar | zstd`` to a local file and back."""
        assert self.plan is not None
        archive = self.run_dir / "cache.tzst"
        tar = (f"tar --posix -cf - -P -C {shlex.quote(str(self.ws))} data | zstd -T0 --long=30 "
               f"-q -f -o {shlex.quote(str(archive))}")
        self.timed(SAVE1, FLOOR, ["bash", "-o", "pipefail", "-c", tar], self.ws)
        self.rows.note("stored, first version", FLOOR, archive.stat().st_size)
        remove(self.ws_restore / "data")
        self.timed(RESTORE1, FLOOR, ["bash", "-o", "pipefail", "-c",
                                     f"zstd -d --long=30 -q -c {shlex.quote(str(archive))} | "
                                     f"tar -xf - -P -C {shlex.quote(str(self.ws_restore))}"],
                   self.ws_restore)
        self.check_restored(FLOOR)
        remove(self.ws_restore / "data")
        with self.plan.applied(self.ws / "data", self.run_dir / "backup"):
            self.timed(SAVE2, FLOOR, ["bash", "-o", "pipefail", "-c", tar], self.ws)
        self.rows.note("stored, second version", FLOOR, archive.stat().st_size)
        archive.unlink()

    def run(self) -> None:
        """Set up the workspaces, then interleave the two sides round after round."""
        remove(self.run_dir)
        for d in (self.ws, self.ws_restore, self.run_dir / "tmp", self.run_dir / "home"):
            d.mkdir(parents=True)
        log(f"copying the data set to {self.ws / 'data'}")
        run(["cp", "-a", str(self.ds.root), str(self.ws / "data")])
        self.plan = ChangePlan.for_tree(self.ws / "data", self.args.seed)
        WATCH.quiet_wait = self.args.quiet_wait
        try:
            for i in range(self.args.runs):
                log(f"== round {i + 1}/{self.args.runs}")
                sides = [self.stickyci, self.floor]
                for side in sides if i % 2 == 0 else sides[::-1]:
                    side()
            if self.args.profile:
                log("== profile")
                self.profile()
        finally:
            remove(self.run_dir)

    def report(self, command: str, started_at: str) -> str:
        """The Markdown section."""
        m, r = machine(), self.rows
        assert self.plan is not None
        lines = [
            "## GitHub Actions cache: `@actions/cache` through `stickyci serve` against "
            "`tar | zstd`", "",
            f"Command: `{command}`, started {started_at} UTC, medians of {self.args.runs} "
            f"rounds. Data set: {self.ds.title}, {self.ds.stats.summary()}. Machine: "
            f"{m['cpu']}, {m['nproc']} CPUs, {m['ram']}, kernel {m['kernel']}, Node "
            f"{first_line(['node', '--version'])}, `@actions/cache` "
            f"{client_version()}, {m['zstd']}. This checkout: {stickyci_revision()}.", "",
            "**stickyci**: a fresh `stickyci serve` (`file://` store, access log off) each "
            "round; the real client (`tests/gha_client/driver.js`, one `node` process per "
            "operation, timed whole: it tars and compresses with zstd into `RUNNER_TEMP`, "
            "uploads, and the server decompresses, chunks and stores the archive before "
            "finalize answers; a restore downloads the archive, which the server recompresses "
            "as it streams, then extracts it). **Floor**: the client's own `tar | zstd` to a "
            "local file and back, no network and no server. The changed version: "
            f"{self.plan.describe()}. Trees and store are in the page cache.", "",
            f"| operation | stickyci | {FLOOR_LABEL} | stickyci / floor |",
            "|---|---:|---:|---:|"]
        for op in OPS:
            lines.append(f"| {op} | {r.med(op, ST):.2f} s | {r.med(op, FLOOR):.2f} s | "
                         f"{ratio(r.med(op, ST), r.med(op, FLOOR))} |")
        lines += ["", "| bytes stored | stickyci (growth of the store) | floor (archive file) |"
                  " stickyci / floor |", "|---|---:|---:|---:|"]
        for what in ("stored, first version", "stored, second version"):
            lines.append(f"| {what} | {r.bytes(what, ST) / MB:,.1f} MB | "
                         f"{r.bytes(what, FLOOR) / MB:,.1f} MB | "
                         f"{ratio(r.bytes(what, ST), r.bytes(what, FLOOR))} |")
        lines += ["", f"The server's counters: the client uploaded "
                  f"{r.bytes('archive uploaded', ST) / MB:,.1f} MB of archive for the first "
                  "version; the content the store did not hold yet was "
                  f"{r.bytes('new content, first', ST) / MB:,.1f} MB for the first version and "
                  f"{r.bytes('new content, second', ST) / MB:,.1f} MB for the second (before "
                  "the store's own compression). Other processes used at most "
                  f"{max(r.other):.0%} of the CPUs during a measurement (each waits up to "
                  f"{self.args.quiet_wait:g} s for a quiet machine first; none is repeated)."]
        if self.profiles:
            lines += ["", "Where the server's time goes (`--profile`: py-spy on `stickyci "
                      "serve`, every thread, 100 samples/s; shares of the samples of threads "
                      "not parked on a lock or a thread pool's queue, entry points left out; "
                      "`Runner.run` on top is the event loop's own C code, I/O and waiting):",
                      ""]
            for op, (inclusive, own) in self.profiles.items():
                lines += [f"- **{op}**: in stickyci's functions (inclusive): "
                          + ", ".join(f"`{n}` {s:.0%}" for n, s in inclusive) + ".",
                          "  At the top of the stack: "
                          + ", ".join(f"`{n}` {s:.0%}" for n, s in own) + "."]
        return "\n".join(lines) + "\n"


def client_version() -> str:
    """The version of ``@actions/cache`` installed for the client."""
    pkg = CLIENT / "node_modules" / "@actions" / "cache" / "package.json"
    return str(json.loads(pkg.read_text())["version"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = cli.parser(__doc__)
    cli.add_tree_options(p, write="this section", seed="seed of the generated tree")
    p.add_argument("--profile", action="store_true",
                   help="then profile the server (py-spy) through a save and a restore")
    return cli.parse_tree_args(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    if shutil.which("node") is None or not (CLIENT / "node_modules" / "@actions").is_dir():
        log("needs node and `npm ci --prefix tests/gha_client`")
        return 2
    for tool in ("zstd", "tar"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed (apt-get install {tool})")
            return 2
    command = cli.command_line("bench/gha.py", argv)
    started_at = cli.started_at()
    work = args.work_dir.resolve()
    dataset = generated_dataset(work, args.seed, args.scale)
    log(f"data set {dataset.key}: {dataset.stats.summary()}")
    bench = GhaBench(args, dataset, work)
    bench.run()
    section = bench.report(command, started_at)
    print(section)
    if args.write:
        write_section(args.write, KEY, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
