#!/usr/bin/env python3
"""Side-by-side benchmark of stickyci sticky disks against tar+zstd, restic and ``cp -a``.

This is a benchmark, not a test. On one data set, in one invocation, it measures what a CI job
does with a sticky disk -- full save, cold restore, warm mount, incremental save -- for stickyci
and for the tools a job would use instead, reports medians over ``--runs`` runs and compares
them with the targets from the issue::

    python3 bench/disks.py --scale 0.05 --runs 1                  # smoke run (~100 MB tree)
    python3 bench/disks.py --runs 3 --write docs/benchmarks.md    # 1 GB generated tree
    python3 bench/disks.py --dataset real --runs 3 --write docs/benchmarks.md

It needs root (overlayfs mounts, dropping the page cache), ``restic``, ``zstd`` and GNU ``tar``.
Data sets are cached under the work dir (default /var/tmp/stickyci-bench/data); everything a
run writes lives under ``<work dir>/run`` and is removed at the end (``--keep`` keeps it).
The Markdown report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shlex
import stat
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import cli
from harness.datasets import (
    RESTIC_PASSWORD,
    Dataset,
    generated_dataset,
    real_dataset,
)
from harness.fs import (
    can_make_filesystems,
    drop_caches,
    du_bytes,
    filesystem_of,
    no_journal,
    read_tree,
    remove,
    restore_root,
    settle,
    sync_seconds,
    walk,
)
from harness.machine import machine, src_fingerprint, stickyci_revision
from harness.noise import WATCH, timed
from harness.proc import log, run
from harness.report import MB, Target, mb, ratio, secs, target_table, write_section
from harness.treebench import TreeBench

from stickyci import disks
from stickyci.errors import NotAMount
from stickyci.store import LocalBackend, ObjectStore

KEY = "bench"

# The incremental change from the issue.
CHANGE_EVERY = 100
APPEND_BYTES = 1024
REPLACE_NEAR = 42_000_000
REPLACEMENT_SIZE = 50 << 20

# Operation names, as rows are grouped in the report.
SAVE, RESTORE, WARM, INCR = "full save", "cold restore", "warm mount", "incremental save"
ST_SAVE_OVL = "stickyci commit (API, overlay)"
ST_SAVE_COPY = "stickyci commit (API, copy)"
ST_SAVE_CLI = "python3 -m stickyci disk commit (CLI, overlay)"
ST_MOUNT_OVL = "stickyci mount (overlay)"
ST_MOUNT_COPY = "stickyci mount (copy)"
ST_INC_OVL = "stickyci commit (overlay)"
ST_INC_COPY = "stickyci commit (copy)"
TAR_SAVE = "tar \\| zstd -T0 -3"
TAR_RESTORE = "zstd -d \\| tar -x"
TAR_INC = "tar \\| zstd -T0 -3 (whole tree)"
RESTIC_SAVE = "restic backup"
RESTIC_RESTORE = "restic restore"
RESTIC_INC = "restic backup (parent snapshot)"
CP = "cp -a"
# The stickyci row each operation's peers are compared with.
REFERENCE = {SAVE: ST_SAVE_OVL, RESTORE: ST_MOUNT_OVL, WARM: ST_MOUNT_OVL, INCR: ST_INC_OVL}


# --------------------------------------------------------------------------------------------
# The incremental change


@dataclass(slots=True)
class ChangePlan:
    """1 KiB of random bytes appended to every 100th file (sorted order), and the file nearest
    42 MB replaced by a new 50 MiB random one. Deterministic, so every run applies the same."""

    appends: list[tuple[str, bytes]]
    replace: str
    replaced_size: int
    replacement: bytes

    @classmethod
    def for_tree(cls, root: Path, seed: int) -> ChangePlan:
        """Plan the change for the tree at ``root``."""
        sizes = {rel: st.st_size for rel, st in walk(root) if stat.S_ISREG(st.st_mode)}
        files = sorted(sizes)
        replace = min(files, key=lambda r: (abs(sizes[r] - REPLACE_NEAR), r))
        rng = random.Random(f"{seed}:change")
        appends = [(rel, rng.randbytes(APPEND_BYTES))
                   for rel in files[CHANGE_EVERY - 1::CHANGE_EVERY] if rel != replace]
        return cls(appends, replace, sizes[replace], rng.randbytes(REPLACEMENT_SIZE))

    @property
    def paths(self) -> list[str]:
        """Every changed file."""
        return [*(rel for rel, _ in self.appends), self.replace]

    def new_bytes(self) -> bytes:
        """Just the bytes the change wrote."""
        return b"".join(d for _, d in self.appends) + self.replacement

    def describe(self) -> str:
        """One line for the report."""
        return (f"{APPEND_BYTES} random bytes appended to {len(self.appends)} files (every "
                f"{CHANGE_EVERY}th in sorted order), `{self.replace}` "
                f"({self.replaced_size / MB:.1f} MB) replaced by {REPLACEMENT_SIZE >> 20} MiB of "
                "random bytes")

    def apply(self, root: Path) -> None:
        """Make the change under ``root``."""
        for rel, data in self.appends:
            with open(root / rel, "ab") as f:
                f.write(data)
        target = root / self.replace
        mode = stat.S_IMODE(target.stat().st_mode)
        # A linker writes a new file and renames it over the old one; do the same, so an overlay
        # does not first copy the old 42 MB up.
        tmp = target.with_name(f".{target.name}.bench-new")
        tmp.write_bytes(self.replacement)
        os.chmod(tmp, mode)
        os.replace(tmp, target)

    @contextlib.contextmanager
    def applied(self, root: Path, backup: Path) -> Iterator[None]:
        """Apply the change to ``root`` and undo it afterwards, keeping unchanged files as they
        were (same inode, size, times) so restic's parent snapshot still matches them."""
        saved = {rel: os.stat(root / rel) for rel, _ in self.appends}
        remove(backup)
        os.link(root / self.replace, backup)  # the original inode, outside the tree
        try:
            self.apply(root)
            yield
        finally:
            for rel, st in saved.items():
                os.truncate(root / rel, st.st_size)
                os.utime(root / rel, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(backup, root / self.replace)


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass(slots=True)
class Row:
    """One tool doing one operation, over the runs."""

    op: str
    tool: str
    cache: str
    seconds: list[float] = field(default_factory=list)
    synced: list[float] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    other_cpu: list[float] = field(default_factory=list)
    background: list[float] = field(default_factory=list)
    retried: int = 0
    note: str = ""

    @property
    def median(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.seconds)

    def drop_last(self) -> None:
        """Forget the last run's figures (it is measured again)."""
        n = len(self.seconds) - 1
        for samples in (self.seconds, self.synced, self.other_cpu, self.stored, self.background):
            del samples[n:]


class Bench(TreeBench[Row]):
    """Runs every operation on one data set and keeps the rows."""

    def __init__(self, args: argparse.Namespace, dataset: Dataset, work: Path) -> None:
        super().__init__(args, dataset, work / "run", need=6 * dataset.stats.bytes)
        self.mnt = self.run_dir / "mnt"
        self.saved_store = self.run_dir / "saved-store"
        self.tar_out = self.run_dir / "full.tar.zst"
        self.restic_repo = self.run_dir / "restic"
        self.restic_cache = self.run_dir / "restic-cache"
        self.cp_out = self.run_dir / "cp-out"
        self.warm_cache = self.run_dir / "cache-warm"
        self.cold_ok = True
        self.snapshot = ""
        self.fresh_fs = can_make_filesystems()

    # -- helpers ---------------------------------------------------------------------------

    def record(self, op: str, tool: str, cache: str, seconds: float, *, synced: float | None = None,
               stored: int | None = None, background: float | None = None,
               note: str = "") -> None:
        """Add one run's figures to a row."""
        self.sample_disk()
        row = self.rows.setdefault((op, tool), Row(op, tool, cache, note=note))
        row.seconds.append(seconds)
        row.other_cpu.append(WATCH.other_share)
        if background is not None:
            row.background.append(background)
        row.synced.append(seconds if synced is None else synced)
        if stored is not None:
            row.stored.append(stored)
        log(f"  {op:16} {tool.replace(chr(92), ''):46} {seconds:8.3f} s"
            + (f"  stored {stored / MB:9.2f} MB" if stored is not None else "")
            + f"  other CPU {row.other_cpu[-1]:.0%}")

    def restic_env(self, repo: Path | None = None) -> dict[str, str]:
        """restic's environment: password, repository and a cache dir under the run dir."""
        return {**os.environ, "RESTIC_PASSWORD": RESTIC_PASSWORD,
                "RESTIC_REPOSITORY": str(repo or self.restic_repo),
                "RESTIC_CACHE_DIR": str(self.restic_cache)}

    def cold(self) -> None:
        """Drop the page cache before a cold measurement."""
        self.cold_ok = drop_caches() and self.cold_ok

    @contextlib.contextmanager
    def mounted(self, path: Path, strategy: str, store: Path,
                cache: Path) -> Iterator[tuple[disks.MountResult, float]]:
        """Mount ``KEY`` at ``path``; yield the result and the mount's wall time. Always leaves
        ``path`` unmounted: after a commit the record is gone, otherwise the API unmounts it."""
        os.environ["STICKYCI_CACHE_DIR"] = str(cache)
        path.mkdir(parents=True, exist_ok=True)
        start = WATCH.begin()
        result = disks.mount(KEY, path, strategy=strategy, store=f"file://{store}")
        seconds = WATCH.end() - start
        try:
            yield result, seconds
        finally:
            os.environ["STICKYCI_CACHE_DIR"] = str(cache)
            with contextlib.suppress(NotAMount):
                disks.unmount(path)
            settle(cache, time.perf_counter())

    def warm_up(self) -> None:
        """Re-read the tree and write back dirty pages right before a warm measurement: this
        VM reclaims idle page cache on its own, so 'read once at the start' does not last."""
        read_tree(self.tree)
        os.sync()

    def fresh_mnt(self) -> Path:
        """An empty mount point."""
        remove(self.mnt)
        self.mnt.mkdir(parents=True)
        return self.mnt

    # -- set-up ----------------------------------------------------------------------------

    # -- 1. full save ------------------------------------------------------------------------

    def phase_save(self) -> None:
        """Full save, page cache warm: stickyci commit after an untimed populate, and peers."""
        log("== full save (source in the page cache)")
        read_tree(self.tree)
        for i in range(self.args.runs):
            log(f" run {i + 1}/{self.args.runs}")
            self.attempt(SAVE, ST_SAVE_OVL,
                         lambda: self.save_stickyci("overlay", cli=False, keep=True))
            self.attempt(SAVE, ST_SAVE_COPY,
                         lambda: self.save_stickyci("copy", cli=False, keep=False))
            if not self.args.no_cli:
                self.attempt(SAVE, ST_SAVE_CLI,
                             lambda: self.save_stickyci("overlay", cli=True, keep=False))
            if not self.args.stickyci_only:
                self.attempt(SAVE, TAR_SAVE, self.save_tar)
                self.attempt(SAVE, RESTIC_SAVE, self.save_restic)
                self.attempt(SAVE, CP, self.save_cp)

    def save_stickyci(self, strategy: str, *, cli: bool, keep: bool) -> None:
        """Mount a fresh key on a fresh store, copy the tree in (not timed), time the commit."""
        tag = f"{strategy}-{'cli' if cli else 'api'}"
        store, cache = self.run_dir / f"store-{tag}", self.run_dir / f"cache-{tag}"
        remove(store)
        remove(cache)
        mnt = self.fresh_mnt()
        with self.mounted(mnt, strategy, store, cache) as (res, _):
            if res.strategy != strategy:
                raise RuntimeError(f"asked for {strategy}, stickyci mounted {res.strategy}")
            run(["cp", "-a", f"{self.tree}/.", f"{mnt}/"])
            read_tree(mnt)  # in the page cache, like the peers' input
            os.sync()  # the populate's write-back must not land in the commit's fsyncs
            self.sample_disk()
            if cli:
                env = {**os.environ, "STICKYCI_CACHE_DIR": str(cache)}
                start = WATCH.begin()
                out = run([sys.executable, "-m", "stickyci", "disk", "commit", str(mnt),
                           "--json"], env=env)
                seconds = WATCH.end() - start
                doc = json.loads(out.stdout)
            else:
                start = WATCH.begin()
                doc = disks.commit(mnt).as_dict()
                seconds = WATCH.end() - start
            synced = seconds + sync_seconds()
            background = settle(cache, start + seconds)
        if not doc["committed"] or doc["files"] != self.ds.stats.files:
            log(f"WARNING: stickyci commit ({tag}) stored {doc['files']} files: {doc}")
        self.facts[f"stored_bytes_{tag}"] = doc["stored_bytes"]
        tool = ST_SAVE_CLI if cli else (ST_SAVE_OVL if strategy == "overlay" else ST_SAVE_COPY)
        self.record(SAVE, tool, "warm", seconds, synced=synced, stored=du_bytes(store),
                    background=background)
        remove(cache)  # a copy commit adopted its clone as a base here
        remove(self.mnt)
        if keep:
            remove(self.saved_store)
            os.rename(store, self.saved_store)
        else:
            remove(store)

    def save_tar(self) -> None:
        """``tar | zstd -T0 -3`` of the tree into one archive."""
        remove(self.tar_out)
        self.warm_up()
        seconds = timed(f"tar -C {shlex.quote(str(self.tree))} -cf - . "
                        f"| zstd -T0 -3 -q -f -o {shlex.quote(str(self.tar_out))}")
        self.record(SAVE, TAR_SAVE, "warm", seconds, synced=seconds + sync_seconds(),
                    stored=self.tar_out.stat().st_size)

    def save_restic(self) -> None:
        """``restic backup`` of the tree into a freshly initialised repository."""
        remove(self.restic_repo)
        remove(self.restic_cache)
        env = self.restic_env()
        run(["restic", "init", "-q"], env=env)
        if "restic_config" not in self.facts:
            self.facts["restic_config"] = json.loads(run(["restic", "cat", "config"],
                                                         env=env).stdout)
        self.warm_up()
        seconds = timed(["restic", "backup", "-q", str(self.tree)], env=env)
        self.record(SAVE, RESTIC_SAVE, "warm", seconds, synced=seconds + sync_seconds(),
                    stored=du_bytes(self.restic_repo))

    def save_cp(self) -> None:
        """``cp -a`` of the tree."""
        remove(self.cp_out)
        self.warm_up()
        seconds = timed(["cp", "-a", str(self.tree), str(self.cp_out)])
        self.record(SAVE, CP, "warm", seconds, synced=seconds + sync_seconds(),
                    stored=du_bytes(self.cp_out))

    # -- 2. cold restore ---------------------------------------------------------------------

    def phase_restore(self) -> None:
        """Cold restore: page cache dropped, empty base cache (and empty restic cache), each
        onto a filesystem of its own where one can be made (``restore_root``)."""
        log("== cold restore (page cache dropped before each)")
        for i in range(self.args.runs):
            log(f" run {i + 1}/{self.args.runs}")
            self.attempt(RESTORE, ST_MOUNT_COPY, lambda: self.restore_stickyci("copy"))
            self.attempt(RESTORE, ST_MOUNT_OVL, lambda: self.restore_stickyci("overlay"))
            if not self.args.stickyci_only:
                self.attempt(RESTORE, TAR_RESTORE, self.restore_tar)
                self.attempt(RESTORE, RESTIC_RESTORE, self.restore_restic)
                self.attempt(RESTORE, CP, self.restore_cp)
        # The warm and incremental runs need the snapshot's base in the warm cache (untimed).
        remove(self.warm_cache)
        with self.mounted(self.fresh_mnt(), "overlay", self.saved_store, self.warm_cache):
            pass

    def restore_root(self) -> contextlib.AbstractContextManager[Path]:
        """Where one cold restore writes (``harness.fs.restore_root``): room for the copy
        strategy's base and clone."""
        return restore_root(self.run_dir, 3 * self.ds.stats.bytes + 2**30, fresh=self.fresh_fs)

    def restore_stickyci(self, strategy: str) -> None:
        """A mount with an empty base cache: the snapshot is restored from the store."""
        tool = ST_MOUNT_OVL if strategy == "overlay" else ST_MOUNT_COPY
        with self.restore_root() as root:
            target = root / "restore"
            self.cold()
            with self.mounted(target, strategy, self.saved_store, root / "cache") as (res,
                                                                                     seconds):
                synced = seconds + sync_seconds()
                self.snapshot = res.snapshot
                if res.base_cached:
                    log("WARNING: the cold mount found its base cached")
                self.check_tree(target, tool)
                self.sample_disk()
            self.record(RESTORE, tool, "cold", seconds, synced=synced)

    def restore_tar(self) -> None:
        """``zstd -d | tar -x`` of the full save's archive."""
        with self.restore_root() as root:
            self.cold()
            seconds = timed(f"zstd -d -c -q {shlex.quote(str(self.tar_out))} "
                            f"| tar -x -C {shlex.quote(str(root))}")
            self.record(RESTORE, TAR_RESTORE, "cold", seconds, synced=seconds + sync_seconds())
            self.check_tree(root, TAR_RESTORE)

    def restore_restic(self) -> None:
        """``restic restore latest`` with an empty restic cache."""
        with self.restore_root() as root:
            env = {**self.restic_env(), "RESTIC_CACHE_DIR": str(root / "restic-cache")}
            self.cold()
            seconds = timed(["restic", "restore", "latest", "-q", "--target",
                             str(root / "restore")], env=env)
            self.record(RESTORE, RESTIC_RESTORE, "cold", seconds,
                        synced=seconds + sync_seconds())
            # restic restores under the absolute path it backed up.
            self.check_tree(root / "restore" / self.tree.relative_to("/"), RESTIC_RESTORE)

    def restore_cp(self) -> None:
        """``cp -a`` back from the full save's copy."""
        with self.restore_root() as root:
            self.cold()
            seconds = timed(["cp", "-a", str(self.cp_out), str(root / "restore")])
            self.record(RESTORE, CP, "cold", seconds, synced=seconds + sync_seconds())
            self.check_tree(root / "restore", CP)

    # -- 3. warm mount -----------------------------------------------------------------------

    def phase_warm(self) -> None:
        """Warm mount: the base is in the local base cache (and the page cache)."""
        log("== warm mount (base cached)")
        for i in range(self.args.runs):
            log(f" run {i + 1}/{self.args.runs}")
            self.attempt(WARM, ST_MOUNT_OVL, lambda: self.warm_stickyci("overlay"))
            self.attempt(WARM, ST_MOUNT_COPY, lambda: self.warm_stickyci("copy"))

    def warm_stickyci(self, strategy: str) -> None:
        """A mount whose base is cached."""
        mnt = self.fresh_mnt()
        with self.mounted(mnt, strategy, self.saved_store, self.warm_cache) as (res, seconds):
            synced = seconds + sync_seconds()
            if not res.base_cached:
                log("WARNING: the warm mount did not find its base cached")
        self.record(WARM, ST_MOUNT_OVL if strategy == "overlay" else ST_MOUNT_COPY, "warm",
                    seconds, synced=synced)

    # -- 4. incremental ----------------------------------------------------------------------

    def phase_incremental(self) -> None:
        """The 1% change on top of the full save; every run starts from a copy of that save."""
        log("== incremental save")
        plan = ChangePlan.for_tree(self.tree, self.args.seed)
        self.facts["change"] = plan.describe()
        self.facts["changed_files"] = len(plan.paths)
        self.facts["changed_new_bytes"] = len(plan.new_bytes())
        self.facts["changed_new_zst"] = len(run(["zstd", "-3", "-q", "-c"],
                                                data=plan.new_bytes()).stdout)
        with plan.applied(self.tree, self.backup):
            whole = b"".join((self.tree / p).read_bytes() for p in plan.paths)
        self.facts["changed_files_bytes"] = len(whole)
        self.facts["changed_files_zst"] = len(run(["zstd", "-3", "-q", "-c"], data=whole).stdout)
        del whole
        read_tree(self.tree)
        for i in range(self.args.runs):
            log(f" run {i + 1}/{self.args.runs}")
            self.attempt(INCR, ST_INC_OVL, lambda: self.incremental_stickyci(plan, "overlay"))
            self.attempt(INCR, ST_INC_COPY, lambda: self.incremental_stickyci(plan, "copy"))
            if not self.args.stickyci_only:
                self.attempt(INCR, RESTIC_INC, lambda: self.incremental_restic(plan))
                self.attempt(INCR, TAR_INC, lambda: self.incremental_tar(plan))
        remove(self.run_dir / "inc-store")
        remove(self.run_dir / "inc-index")
        remove(self.run_dir / "restic-inc")

    @property
    def backup(self) -> Path:
        """Where the replaced file's original waits while the working copy is changed."""
        return self.run_dir / "replaced-original"

    def incremental_stickyci(self, plan: ChangePlan, strategy: str) -> None:
        """Mount (base cached) on a copy of the full save's store, change, time the commit."""
        store = self.run_dir / "inc-store"
        remove(store)
        run(["cp", "-a", str(self.saved_store), str(store)])
        # The runner's local index describes this copy of the saved store, as it would on a
        # runner that used the store before: not empty (the commit would list and read every
        # index), nor holding the packs the previous run's commit added to the copy it
        # replaced (the commit would deduplicate against packs that are gone, then store
        # everything again).
        index, saved_index = self.warm_cache / "index", self.run_dir / "inc-index"
        if not saved_index.exists():
            os.environ["STICKYCI_CACHE_DIR"] = str(self.warm_cache)
            ObjectStore(LocalBackend(store))  # lists the copy once, filling the local index
            run(["cp", "-a", str(index), str(saved_index)])
        remove(index)
        run(["cp", "-a", str(saved_index), str(index)])
        before = du_bytes(store)
        mnt = self.fresh_mnt()
        # An overlay commit takes its old base over as the new snapshot's (nothing else uses
        # it), and a cold copy mount leaves none: put the saved snapshot's base back first.
        with self.mounted(mnt, "overlay", store, self.warm_cache):
            pass
        with self.mounted(mnt, strategy, store, self.warm_cache) as (res, _):
            if not res.base_cached:
                log("WARNING: the incremental mount did not find its base cached")
            plan.apply(mnt)
            os.sync()
            self.sample_disk()
            start = WATCH.begin()
            result = disks.commit(mnt)
            seconds = WATCH.end() - start
            synced = seconds + sync_seconds()
            background = settle(self.warm_cache, start + seconds)
        # Directories whose mtime moved count as modified too, hence "<".
        if result.modified < len(plan.paths):
            log(f"WARNING: the commit saw {result.modified} modified entries, "
                f"expected at least {len(plan.paths)}")
        self.facts[f"inc_stored_bytes_{strategy}"] = result.stored_bytes
        self.record(INCR, ST_INC_OVL if strategy == "overlay" else ST_INC_COPY, "warm", seconds,
                    synced=synced, stored=du_bytes(store) - before, background=background)
        self.prune_bases()

    def incremental_restic(self, plan: ChangePlan) -> None:
        """``restic backup`` of the changed tree into a copy of the full save's repository."""
        repo = self.run_dir / "restic-inc"
        remove(repo)
        run(["cp", "-a", str(self.restic_repo), str(repo)])
        before = du_bytes(repo)
        with plan.applied(self.tree, self.backup):
            self.warm_up()
            seconds = timed(["restic", "backup", "-q", str(self.tree)],
                            env=self.restic_env(repo))
            self.record(INCR, RESTIC_INC, "warm", seconds, synced=seconds + sync_seconds(),
                        stored=du_bytes(repo) - before)

    def incremental_tar(self, plan: ChangePlan) -> None:
        """``tar | zstd`` of the whole changed tree."""
        out = self.run_dir / "inc.tar.zst"
        remove(out)
        with plan.applied(self.tree, self.backup):
            self.warm_up()
            seconds = timed(f"tar -C {shlex.quote(str(self.tree))} -cf - . "
                            f"| zstd -T0 -3 -q -f -o {shlex.quote(str(out))}")
            self.record(INCR, TAR_INC, "warm", seconds, synced=seconds + sync_seconds(),
                        stored=out.stat().st_size)

    def prune_bases(self) -> None:
        """Drop bases a copy commit adopted, so the warm cache holds only the saved snapshot."""
        bases = self.warm_cache / "bases"
        for entry in bases.iterdir():
            if not entry.name.startswith((self.snapshot, ".")):
                remove(entry)

    # -- 5. store size -----------------------------------------------------------------------

    def sizes(self) -> list[tuple[str, int]]:
        """What each tool keeps after the full save."""
        out = [("stickyci store (`du -sb`)", du_bytes(self.saved_store))]
        if not self.args.stickyci_only:
            out += [("restic repository (`du -sb`)", du_bytes(self.restic_repo)),
                    ("tar.zst archive", self.tar_out.stat().st_size),
                    ("cp -a copy (`du -sb`)", du_bytes(self.cp_out))]
        return out


# --------------------------------------------------------------------------------------------
# The report


def timing_table(bench: Bench) -> str:
    """Medians per operation and tool, with stickyci / peer ratios."""
    size = bench.ds.stats.bytes
    head = ("| operation | tool | cache | wall s (median) | min-max s | + sync s | MB/s | "
            "stored MB | stickyci / tool | other CPU |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for row in bench.rows.values():
        ref = bench.rows.get((row.op, REFERENCE[row.op]))
        if row.tool == REFERENCE[row.op]:
            versus = "(reference)"
        elif ref is not None and not row.tool.startswith(("stickyci", "python3 -m stickyci")):
            versus = ratio(ref.median, row.median)
        else:
            versus = ""
        stored = mb(statistics.median(row.stored)) if row.stored else ""
        lines.append(f"| {row.op} | {row.tool} | {row.cache} | {secs(row.median)} | "
                     f"{secs(min(row.seconds))}-{secs(max(row.seconds))} | "
                     f"{secs(statistics.median(row.synced))} | {size / MB / row.median:,.0f} | "
                     f"{stored} | {versus} | {statistics.median(row.other_cpu):.0%} |")
    return "\n".join(lines)


def size_table(bench: Bench, sizes: list[tuple[str, int]]) -> str:
    """Bytes kept after the full save, against the tree and against the stickyci store."""
    tree = bench.ds.stats.bytes
    lines = ["| what | bytes | MB | tree / this | stickyci / this |", "|---|---:|---:|---:|---:|"]
    ours = sizes[0][1]
    for name, n in sizes:
        lines.append(f"| {name} | {n:,} | {mb(n)} | {ratio(tree, n)} | {ratio(ours, n)} |")
    return "\n".join(lines)


def incremental_table(bench: Bench) -> str:
    """What the incremental save stored, against the compressed size of what changed."""
    f = bench.facts
    new_zst, files_zst = f["changed_new_zst"], f["changed_files_zst"]
    lines = ["| what | bytes | MB | / changed bytes (zstd -3) | / changed files (zstd -3) |",
             "|---|---:|---:|---:|---:|",
             f"| changed bytes: the appended KiBs + the 50 MiB file, zstd -3 | {new_zst:,} | "
             f"{mb(new_zst)} | 1.00x | {ratio(new_zst, files_zst)} |",
             f"| changed files, whole new content ({f['changed_files_bytes'] / MB:,.1f} MB), "
             f"zstd -3 | {files_zst:,} | {mb(files_zst)} | {ratio(files_zst, new_zst)} | 1.00x |"]
    for strategy in ("overlay", "copy"):
        n = f.get(f"inc_stored_bytes_{strategy}")
        if n is not None:
            lines.append(f"| stickyci commit ({strategy}): pack bytes written | {n:,} | {mb(n)} "
                         f"| {ratio(n, new_zst)} | {ratio(n, files_zst)} |")
    for tool in (ST_INC_OVL, ST_INC_COPY, RESTIC_INC, TAR_INC):
        row = bench.rows.get((INCR, tool))
        if row and row.stored:
            n = int(statistics.median(row.stored))
            what = "archive size" if tool == TAR_INC else "store growth (`du -sb`)"
            lines.append(f"| {tool}: {what} | {n:,} | {mb(n)} | {ratio(n, new_zst)} | "
                         f"{ratio(n, files_zst)} |")
    return "\n".join(lines)


def targets(bench: Bench, sizes: list[tuple[str, int]]) -> list[Target]:
    """The issue's targets against this run's medians."""

    def med(op: str, tool: str) -> float | None:
        row = bench.rows.get((op, tool))
        return row.median if row else None

    def scaled(x: float | None, k: float) -> float | None:
        return None if x is None else x * k

    full, tar = med(SAVE, ST_SAVE_OVL), med(SAVE, TAR_SAVE)
    size = dict(sizes)
    stored = bench.facts.get("inc_stored_bytes_overlay")
    new_zst = bench.facts.get("changed_new_zst")
    return [
        Target("warm mount (overlay) <= 0.05 s", med(WARM, ST_MOUNT_OVL), 0.05, "s"),
        Target("full commit <= tar+zstd time", full, tar, "s"),
        Target("full commit <= 0.6x restic backup", full, scaled(med(SAVE, RESTIC_SAVE), 0.6),
               "s"),
        Target("cold mount (overlay) <= 0.9x tar+zstd extraction", med(RESTORE, ST_MOUNT_OVL),
               scaled(med(RESTORE, TAR_RESTORE), 0.9), "s"),
        Target("cold mount (copy) <= tar+zstd extraction", med(RESTORE, ST_MOUNT_COPY),
               med(RESTORE, TAR_RESTORE), "s"),
        Target("incremental commit (overlay) <= 0.3 s", med(INCR, ST_INC_OVL), 0.3, "s"),
        Target("incremental commit (copy) <= 1.5 s", med(INCR, ST_INC_COPY), 1.5, "s"),
        Target("incremental stored <= 1.2x changed bytes (zstd -3)",
               None if stored is None else stored / MB, scaled(new_zst, 1.2 / MB), "MB"),
        Target("store size <= restic repository", size["stickyci store (`du -sb`)"] / MB,
               scaled(size.get("restic repository (`du -sb`)"), 1 / MB), "MB"),
    ]


def report(bench: Bench, command: str, sizes: list[tuple[str, int]], started: str,
           revision: str) -> str:
    """The Markdown section for this data set."""
    m = machine()
    fs = filesystem_of(bench.run_dir.parent)
    restic_cfg = bench.facts.get("restic_config", {})
    notes = [
        f"- **Data set:** {bench.ds.description}. {bench.ds.stats.summary()}.",
        f"- **Machine:** {m['cpu']}, {m['nproc']} CPUs, {m['ram']} RAM, Linux {m['kernel']}; "
        f"work dir `{bench.run_dir.parent}` on {' on '.join(fs)}."
        + (f" A VM with {m['vm']}: idle page cache is reclaimed proactively and large copies "
           "vary a lot, nearly all in system time (by hand, `cp -a` of the 1 GB generated tree "
           "took from 1.8 s to 30 s on an idle machine); the `cp -a` rows are the least "
           "reliable." if m["vm"] else ""),
        f"- **Software:** stickyci {revision}, Python {m['python']}; {m['restic']} "
        f"(repository version {restic_cfg.get('version', '?')}, default compression `auto`); "
        f"{m['zstd']}; {m['tar']}.",
        f"- **Date:** {started} (UTC). **Runs:** {bench.args.runs}, medians reported. "
        f"Peak disk use of the run dir {bench.disk_peak / 2**30:.1f} GiB (the data set's "
        f"cached copy not included).",
        f"- **Command:** `{command}`",
        "- **Method:** each incremental run starts from a copy of the full save's store, with "
        "the runner's local index of that copy (until 2026-11-30 the index kept the packs the "
        "previous run had added, so runs 2 and 3 deduplicated against packs that were gone and "
        "stored their content twice).",
    ]
    if no_journal(*fs):
        notes.append("- **File creation:** the work dir is on ext4 without a journal, where "
                     "creating a file passes over every inode freed in the last 60 s (360 s "
                     "while its inode table block is dirty), one at a time (`recently_deleted` "
                     "in `find_inode_bit`): right after a run deletes a tree, each new file "
                     "costs up to ~0.7 ms of system time. That inflates what creates files "
                     "(`cp -a`, and stickyci's commit, which writes the committed tree into "
                     "the base cache), not tar's or restic's save.")
    notes.append(
        "- **Cold restores** each write to a new ext4 filesystem (a sparse image on the work "
        "dir, loop device with direct I/O, the work dir's journal setting), made and deleted "
        "around the measurement, so no restore pays for the inodes the one before it freed "
        "(until 2026-12-01 they shared the work dir, and a restore's time depended on what "
        "had just been deleted)." if bench.fresh_fs else
        "- **Cold restores** write to the work dir (no new filesystem could be made: that "
        "needs root, `mkfs.ext4` and `losetup`): a restore's time depends on what the "
        "measurement before it deleted.")
    if bench.facts.get("src_changed"):
        notes.append("- **Warning:** stickyci's source changed while the benchmark ran; the CLI "
                     "rows may have run newer code than the in-process rows.")
    other = [x for row in bench.rows.values() for x in row.other_cpu]
    if other and max(other) > 0.1:
        notes.append(f"- **Noise:** other processes used up to {max(other):.0%} of the CPUs "
                     "during some measurements (column *other CPU*, median per row); those "
                     "figures are pessimistic.")
    notes += bench.retried_note()
    for row in bench.rows.values():
        if row.background and max(row.background) > 0.05:
            notes.append(f"- **Background work:** after *{row.tool}* ({row.op}) returned, a "
                         "deletion stickyci started in the background ran for another "
                         f"{statistics.median(row.background):.2f} s (median); the benchmark "
                         "waits for it before the next measurement.")
    if not bench.cold_ok:
        notes.append("- **Warning:** the page cache could not be dropped; 'cold' is not cold.")
    failures = bench.facts.get("failures", [])
    for failure in dict.fromkeys(failures):
        times = failures.count(failure)
        notes.append(f"- **Failed** ({times} of {bench.args.runs} runs): {failure}")
    if bench.facts.get("mismatches"):
        notes.append(f"- **Warning:** restored trees differed from the source for: "
                     f"{', '.join(bench.facts['mismatches'])}.")
    parts = [f"## {bench.ds.title}", "", "\n".join(notes), "",
             "### Targets", "", target_table(targets(bench, sizes)), "",
             "### Timings", "", timing_table(bench), "",
             "### Store size after the full save", "", size_table(bench, sizes)]
    if "changed_new_zst" in bench.facts:
        parts += ["", "### Incremental: bytes stored", "",
                  f"Change: {bench.facts['change']}.", "", incremental_table(bench)]
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = cli.parser(__doc__)
    p.add_argument("--dataset", choices=("generated", "real"), default="generated",
                   help="generated build tree (default) or a real tree from this machine")
    p.add_argument("--real-source", help="tree to copy for --dataset real (default: the Rust "
                   "toolchain, else Python's lib dir)")
    cli.add_tree_options(p, write="this data set's section",
                     seed="seed of the generated tree and change")
    p.add_argument("--stickyci-only", action="store_true", help="skip the peers (profiling)")
    p.add_argument("--no-cli", action="store_true", help="skip the CLI commit measurement")
    p.add_argument("--keep", action="store_true", help="keep <work dir>/run afterwards")
    return cli.parse_tree_args(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="stickyci: %(message)s")
    if not cli.preflight("restic", "zstd", "tar", "du", "cp"):
        return 2
    command = cli.command_line("bench/disks.py", argv)
    started = cli.started_at()
    # Taken now: src/ may change while the benchmark runs, and this is the code it imported.
    revision = stickyci_revision()
    work = args.work_dir.resolve()
    os.environ.pop("STICKYCI_STORE", None)  # every call names its store explicitly
    dataset = (generated_dataset(work, args.seed, args.scale) if args.dataset == "generated"
               else real_dataset(work, args.real_source))
    log(f"data set {dataset.key}: {dataset.stats.summary()}")
    bench = Bench(args, dataset, work)
    WATCH.quiet_wait = args.quiet_wait
    fingerprint = src_fingerprint()
    try:
        bench.setup()
        bench.phase_save()
        sizes = bench.sizes()
        bench.phase_restore()
        bench.phase_warm()
        bench.phase_incremental()
        log(f"peak scratch disk use: {bench.disk_peak / 2**30:.1f} GiB")
        bench.facts["src_changed"] = src_fingerprint() != fingerprint
    finally:
        bench.teardown()
    section = report(bench, command, sizes, started, revision)
    print(section)
    if args.write:
        write_section(args.write, dataset.key, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
