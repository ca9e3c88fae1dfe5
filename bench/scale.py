#!/usr/bin/env python3
"""Flat as the store grows: disk operations on stores of 10, 100 and 1,000 disks.

A runner's commit and mount should cost what the disk costs, not what the whole store holds.
This benchmark fills ``file://`` stores with N small disks (a few files each) and G generations
per disk, one pack per generation (N * G packs: 10,000 at the top), keeps them under the work
dir for later runs, and at each size measures, through the Python API a job's ``stickyci disk``
calls run:

- **commit**: one changed file of a disk mounted with its base cached (overlay);
- **cold mount**: a disk whose base is not cached (the runner's base cache emptied; its local
  index, a runner's own, is kept), and **first mount**: the same on a runner that never saw
  the store (cache dir emptied);
- **warm mount**: the disk just committed, its base cached;
- ``disk ls``, ``evict --dry-run`` and ``gc --dry-run`` (dry runs, so the stores are reused:
  what they read is what a real run reads first);
- the cold mount and the commit again as ``stickyci disk`` processes: what a job pays,
  interpreter start-up included;
- the commit and the cold and first mounts with the local index turned off (the peer rows:
  every index read from the store on every refresh, as before there was one).

on three backends: the ``file://`` store itself; ``s3://`` on a SeaweedFS started here (the
stores copied into one bucket, about a minute); and ``stickyci serve`` over the
``file://`` store with an admin token. Requests are counted at the backend: calls of the
backend methods for ``file://`` and the server, HTTP requests (botocore's ``before-send``) for
S3, so a listing of 10,000 keys counts its ten pages. Ratios are against the 10-disk figures.
A second table gives the benchmark process's own CPU seconds per operation in process, which
the machine's other load disturbs less than the wall time of operations of a few ms::

    python3 bench/scale.py --sizes 10,100 --backends file --runs 1      # smoke run
    python3 bench/scale.py --write docs/benchmarks.md                   # 10, 100, 1000 disks
    python3 bench/scale.py --targets-only --no-peers --runs 7           # commit and mounts only

It needs root (overlay mounts). The Markdown report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from harness import cli
from harness.datasets import DEFAULT_WORK
from harness.fs import remove, unmount_leftovers
from harness.machine import machine, stickyci_revision
from harness.noise import WATCH, timed, wait_quiet
from harness.proc import create_token, free_port, log, started, tests_helpers, wait_http
from harness.report import write_section

from stickyci import disks
from stickyci.disks import api as disks_api
from stickyci.disks import refs
from stickyci.errors import StickyError
from stickyci.snapshot import snapshot_tree
from stickyci.store import Backend, LocalBackend, ObjectStore
from stickyci.store.http import HttpBackend
from stickyci.store.localindex import LocalIndex
from stickyci.store.retry import RetryBackend
from stickyci.store.tier import TieredBackend

tests_helpers()
from seaweed import Seaweed, start_seaweed  # noqa: E402

FILL_FORMAT = 3
"""Bumped when filled stores change shape (2: refs name their packs; 3: small files in
bundles, manifest format 3), so old ones refill."""
FILES = 3
OPS = ("commit", "cold mount", "first mount", "warm mount", "disk ls", "evict", "gc",
       "commit, CLI", "cold mount, CLI")
NO_INDEX = " (no local index)"
"""The peer rows: the same commit and mounts with the runner's local index turned off, as
before there was one (every index read from the store on every refresh)."""
PEER_OPS = ("commit", "cold mount", "first mount")
METHODS = ("put", "get", "stat", "missing", "list", "list_stats", "delete", "read_versioned",
           "put_if")
BUCKET = "scale"


class Counting:
    """A backend whose method calls are counted (for ``file://`` and the server: a call is a
    request); every other attribute is the inner backend's."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in METHODS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


@dataclass
class Client:
    """A runner's view of one store: its backend (as a job's CLI would open it) and a way to
    read how many requests have been made so far."""

    backend: Any
    requests: Callable[[], int]
    env: dict[str, str] = field(default_factory=dict)  # what a job's CLI runs with


@dataclass
class Figures:
    """Seconds and requests per (backend, disks, operation), one entry per run."""

    seconds: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)
    requests: dict[tuple[str, int, str], list[int]] = field(default_factory=dict)
    other: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)

    def add(self, where: tuple[str, int, str], secs: float, reqs: int,
            cpu: float | None = None) -> None:
        """Record one measurement (``cpu``: this process's CPU seconds, for an operation in
        process)."""
        self.seconds.setdefault(where, []).append(secs)
        if cpu is not None:
            self.cpu.setdefault(where, []).append(cpu)
        self.requests.setdefault(where, []).append(reqs)
        self.other.setdefault(where, []).append(WATCH.other_share)
        log(f"  {where[0]:6} {where[1]:5} {where[2]:12} {secs:8.3f} s {reqs:7} requests  "
            f"(other CPU {WATCH.other_share:.0%})")

    def median(self, where: tuple[str, int, str]) -> tuple[float, float] | None:
        """Median seconds and requests, if measured."""
        if where not in self.seconds:
            return None
        return statistics.median(self.seconds[where]), statistics.median(self.requests[where])


# -- filling stores ----------------------------------------------------------------------------

def _write_tree(tree: Path, rng: random.Random, which: int | None) -> None:
    (tree / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(FILES):
        if which is None or which == i:
            (tree / ("sub" if i else "") / f"f{i}.bin").write_bytes(
                rng.randbytes(rng.randint(2_000, 6_000)))


def fill(root: Path, n: int, gens: int, scratch: Path) -> None:
    """A ``file://`` store at ``root`` with ``n`` disks of ``gens`` generations (kept when a
    previous run filled it alike)."""
    marker = root / "filled.json"
    want = {"disks": n, "generations": gens, "format": FILL_FORMAT}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == want:
            return
    log(f"filling {root} with {n} disks x {gens} generations (once; kept for later runs)")
    remove(root)
    backend = LocalBackend(root)
    rng = random.Random(n)
    start = time.perf_counter()
    for i in range(n):
        key, tree = f"d{i:04d}", scratch / "fill-tree"
        remove(tree)
        _write_tree(tree, rng, None)
        store = ObjectStore(backend, load_index=False)  # dedups against its own packs only
        for g in range(1, gens + 1):
            if g > 1:
                _write_tree(tree, rng, g % FILES)
            snap, manifest = snapshot_tree(store, str(tree))
            now = time.time()
            # The packs holding the snapshot, as a commit names them for a new runner.
            packs = store.packs_of([snap.raw, *map(bytes.fromhex, manifest.chunk_digests())])
            assert packs is not None
            gen = refs.Generation(g, snap, now, manifest.size, FILES, store.bytes_written,
                                  "bench-scale", refs.as_hint(packs))

            def change(ref: refs.DiskRef | None, gen: refs.Generation = gen,
                       key: str = key, now: float = now) -> refs.DiskRef:
                new = ref or refs.DiskRef(key, now, now)
                new.add(gen)
                return new

            refs.update_ref(backend, key, change)
        if (i + 1) % 100 == 0:
            log(f"  {i + 1}/{n} disks, {time.perf_counter() - start:.0f} s")
    remove(scratch / "fill-tree")
    marker.write_text(json.dumps(want))


def upload(server: Seaweed, stores: dict[int, Path]) -> None:
    """Copy each filled store into the bucket under the prefix ``n<disks>`` (once)."""
    s3 = server.client()
    with contextlib.suppress(s3.exceptions.ClientError):
        s3.create_bucket(Bucket=BUCKET)
    for n, root in stores.items():
        marker = (root / "filled.json").read_text()
        with contextlib.suppress(s3.exceptions.ClientError):
            got = s3.get_object(Bucket=BUCKET, Key=f"n{n}.filled")["Body"].read().decode()
            if got == marker:
                continue
        names = [p for ns in ("packs", "index", "refs") for p in (root / ns).iterdir()
                 if not p.name.startswith(".")]
        log(f"uploading the {n}-disk store to S3: {len(names)} objects (once)")

        def put(p: Path, n: int = n) -> None:
            s3.put_object(Bucket=BUCKET, Key=f"n{n}/{p.parent.name}/{p.name}", Body=p.read_bytes())

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, names))
        s3.put_object(Bucket=BUCKET, Key=f"n{n}.filled", Body=marker.encode())


# -- measuring ---------------------------------------------------------------------------------

def s3_client(url: str) -> Client:
    """An S3 backend whose HTTP requests are counted."""
    from stickyci.store.s3 import S3Backend

    backend = S3Backend(url)
    sent = Counter[str]()
    backend._s3.meta.events.register("before-send.s3", lambda **_: sent.update(["req"]))
    return Client(backend, lambda: sent["req"], {"STICKYCI_STORE": url})


def http_client(url: str, token: str) -> Client:
    """The server's backend as ``open_backend`` makes it (retries, a local tier), counted
    beneath the tier: only what reaches the server."""
    counting = Counting(RetryBackend(HttpBackend(url, token)))
    from stickyci.paths import cache_home

    tier = TieredBackend(LocalBackend(cache_home() / "tier" / "scale"), counting, 10 << 30)
    return Client(tier, lambda: sum(counting.calls.values()),
                  {"STICKYCI_STORE": url, "STICKYCI_TOKEN": token})


def file_client(url: str) -> Client:
    """The ``file://`` store, its calls counted."""
    counting = Counting(LocalBackend(Path(url.removeprefix("file://"))))
    return Client(counting, lambda: sum(counting.calls.values()), {"STICKYCI_STORE": url})


@contextlib.contextmanager
def without_local_index(off: bool) -> Iterator[None]:
    """With ``off``, object stores keep no local index (the peer rows)."""
    if not off:
        yield
        return
    real = LocalIndex.__dict__["for_backend"]
    setattr(LocalIndex, "for_backend", staticmethod(lambda backend: None))  # noqa: B010
    try:
        yield
    finally:
        setattr(LocalIndex, "for_backend", real)  # noqa: B010


@contextlib.contextmanager
def opened_by_commit(client: Client) -> Iterator[None]:
    """``disks.commit`` opens its store from the mount's record: hand it the counted one."""
    real = disks_api.__dict__["open_backend"]
    setattr(disks_api, "open_backend", lambda url=None: client.backend)  # noqa: B010
    try:
        yield
    finally:
        setattr(disks_api, "open_backend", real)  # noqa: B010


class ScaleBench:
    """Every measurement of one invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = args.work_dir / "scale"
        self.run_dir = self.work / "run"
        self.figures = Figures()
        self.failures: list[str] = []

    def timed(self, where: tuple[str, int, str], client: Client, op: Callable[[], object]) -> None:
        """Measure one operation: wall seconds and requests."""
        wait_quiet(self.args.quiet_wait)
        before = client.requests()
        start = WATCH.begin()
        cpu = time.process_time()
        try:
            op()
        except StickyError as exc:  # one failure must not lose the other figures
            log(f"  FAILED: {where}: {exc}")
            self.failures.append(f"{where[0]}, {where[1]} disks, {where[2]}: {exc}")
            return
        cpu = time.process_time() - cpu
        secs = WATCH.end() - start
        self.figures.add(where, secs, client.requests() - before, cpu)

    def measure(self, kind: str, n: int, make: Callable[[], Client], run: int) -> None:
        """One run of every operation on the ``n``-disk store through ``kind``, then the
        commit and mounts again without a local index."""
        for peer in (False, True):
            with without_local_index(peer):
                self.measure_once(kind, n, make, run, peer)

    def measure_once(self, kind: str, n: int, make: Callable[[], Client], run: int,
                     peer: bool) -> None:
        """One run of the operations on the ``n``-disk store through ``kind``."""
        suffix = NO_INDEX if peer else ""
        if peer and self.args.no_peers:
            return
        cache = self.run_dir / f"cache-{kind}-{n}"
        os.environ["STICKYCI_CACHE_DIR"] = str(cache)
        rng = random.Random(run)
        key = f"d{rng.randrange(n):04d}"
        other = f"d{(int(key[1:]) + 1 + rng.randrange(n - 1)) % n:04d}"
        mnt = self.run_dir / "mnt"

        def mount(k: str) -> Callable[[], object]:
            def go() -> object:
                remove(mnt)
                return disks.mount(k, mnt, strategy="overlay", store=client.backend)
            return go

        remove(cache)  # a runner new to the store: no index, no bases
        client = make()
        self.timed((kind, n, "first mount" + suffix), client, mount(other))
        disks.unmount(mnt)
        remove(cache / "bases")
        client = make()
        self.timed((kind, n, "cold mount" + suffix), client, mount(key))
        (mnt / "f0.bin").write_bytes(os.urandom(4000))
        client = make()
        with opened_by_commit(client):
            self.timed((kind, n, "commit" + suffix), client, lambda: disks.commit(mnt))
        if peer or self.args.targets_only:
            return
        client = make()
        self.timed((kind, n, "warm mount"), client, mount(key))
        disks.unmount(mnt)
        self.timed((kind, n, "disk ls"), client, lambda: disks.list_disks(client.backend))
        self.timed((kind, n, "evict"), client,
                   lambda: disks.evict(365 * 86400, dry_run=True, store=client.backend))
        self.timed((kind, n, "gc"), client,
                   lambda: disks.gc(client.backend, dry_run=True))
        # What a job pays: the same cold mount and commit as `stickyci disk` processes
        # (requests not counted: they happen in the child).
        env = {**os.environ, **client.env}
        remove(cache / "bases")
        remove(mnt)
        mnt.mkdir(parents=True)
        self.cli((kind, n, "cold mount, CLI"),
                 [sys.executable, "-m", "stickyci", "disk", "mount", key, str(mnt),
                  "--strategy", "overlay"], env)
        (mnt / "f0.bin").write_bytes(os.urandom(4000))
        self.cli((kind, n, "commit, CLI"),
                 [sys.executable, "-m", "stickyci", "disk", "commit", str(mnt)], env)

    def cli(self, where: tuple[str, int, str], argv: list[str], env: dict[str, str]) -> None:
        """Measure one ``stickyci`` process: wall seconds, interpreter start-up included."""
        wait_quiet(self.args.quiet_wait)
        self.figures.add(where, timed(argv, env=env), 0)

    def run(self) -> None:
        """Fill, then measure each backend at each size."""
        sizes, gens = self.args.sizes, self.args.generations
        stores = {n: self.work / f"store-{n}x{gens}" for n in sizes}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for n, root in stores.items():
            fill(root, n, gens, self.run_dir)
        for r in range(self.args.runs):
            # Sizes in turn, reversed every other run: the machine drifts within a run (a
            # fixed order put the drift on the largest store: 1.2-1.6x where alternating
            # mounts of the 10- and 1,000-disk stores took the same CPU, 10.2 and 10.1 ms).
            order = sizes if r % 2 == 0 else sizes[::-1]
            if "file" in self.args.backends:
                for n in order:
                    self.measure("file", n, partial(file_client, f"file://{stores[n]}"), r)
            if "s3" in self.args.backends:
                with self.seaweed(stores) as server:
                    for n in order:
                        self.measure("s3", n, partial(s3_client, f"s3://{BUCKET}/n{n}"), r)
                    del server
            if "serve" in self.args.backends:
                for n in order:
                    with self.serving(stores[n]) as (url, token):
                        self.measure("serve", n, partial(http_client, url, token), r)
        unmount_leftovers(self.run_dir)

    @contextlib.contextmanager
    def seaweed(self, stores: dict[int, Path]) -> Iterator[Seaweed]:
        """A fresh SeaweedFS holding the stores (a restarted one may take longer than the
        tests' start-up window to bring its volumes back)."""
        root = self.run_dir / "seaweed"
        remove(root)
        with start_seaweed(root, BUCKET) as server:
            WATCH.ours = [server.process.pid]  # its CPU is the benchmark's, not another's
            os.environ.update({
                "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                "AWS_DEFAULT_REGION": server.region, "STICKYCI_S3_ENDPOINT": server.endpoint,
                "AWS_EC2_METADATA_DISABLED": "true"})
            upload(server, stores)
            try:
                yield server
            finally:
                WATCH.ours = ()

    @contextlib.contextmanager
    def serving(self, store: Path) -> Iterator[tuple[str, str]]:
        """``stickyci serve`` over a filled store, with an admin token (it sees every index
        whole, as the file:// and S3 runs do)."""
        state = self.run_dir / "serve-state"
        remove(state)
        state.mkdir(parents=True)
        token = create_token(state, "--admin")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logf = self.run_dir / "serve.log"
        cmd = [sys.executable, "-m", "stickyci", "serve", "--store", f"file://{store}",
               "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--no-access-log"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STICKYCI_")}
        env["STICKYCI_CACHE_DIR"] = str(self.run_dir / "serve-cache")
        with started([cmd], logf, env=env) as procs:
            wait_http(f"{url}/healthz", procs, logf)
            WATCH.ours = [p.pid for p in procs]
            try:
                yield url, token
            finally:
                WATCH.ours = ()

    def report(self, command: str) -> str:
        """The Markdown section."""
        m = machine()
        other = max((x for xs in self.figures.other.values() for x in xs), default=0.0)
        out = [
            "## Flat as the store grows: 10, 100 and 1,000 disks", "",
            f"`{command}` at {stickyci_revision()}, {cli.started_at()} UTC, on {m['cpu']} "
            f"({m['nproc']} CPUs, {m['ram']}). Each store holds N disks of "
            f"{self.args.generations} generations ({FILES} files of 2-6 KB, one changed per "
            "generation; one pack each, so N x "
            f"{self.args.generations} packs). Medians of {self.args.runs} run(s), through the "
            "Python API (no interpreter start-up); requests counted at the backend (S3: HTTP "
            "requests). Ratios are against the 10-disk store on the same backend in the same "
            f"run. Other processes used up to {other:.0%} of the CPUs during a measurement "
            "(other helpers and tests share the machine).", "",
            "| backend | operation | " + " | ".join(f"{n} disks" for n in self.args.sizes)
            + " | requests (" + ", ".join(str(n) for n in self.args.sizes) + ") | other CPU, "
            "most in a run (" + ", ".join(str(n) for n in self.args.sizes) + ") |",
            "|---|---|" + "---:|" * (len(self.args.sizes) + 2)]
        for kind in self.args.backends:
            for op in [*OPS, *(o + NO_INDEX for o in PEER_OPS)]:
                base = self.figures.median((kind, self.args.sizes[0], op))
                if base is None:
                    continue
                cells, reqs, others = [], [], []
                for n in self.args.sizes:
                    got = self.figures.median((kind, n, op))
                    if got is None:
                        cells.append("")
                        continue
                    secs, req = got
                    ratio = f" ({secs / base[0]:.2f}x)" if n != self.args.sizes[0] else ""
                    cells.append(f"{secs:.3f} s{ratio}")
                    reqs.append("-" if "CLI" in op else f"{req:,.0f}")
                    others.append(f"{max(self.figures.other[(kind, n, op)]):.0%}")
                out.append(f"| {kind} | {op} | " + " | ".join(cells)
                           + f" | {', '.join(reqs)} | {', '.join(others)} |")
        out += ["", "In-process CPU seconds of this process (median; wall time of operations "
                "this short is mostly fsync and the machine's other load):", "",
                "| backend | operation | " + " | ".join(f"{n} disks" for n in self.args.sizes)
                + " |", "|---|---|" + "---:|" * len(self.args.sizes)]
        for kind in self.args.backends:
            for op in [*OPS, *(o + NO_INDEX for o in PEER_OPS)]:
                cpus = [self.figures.cpu.get((kind, n, op)) for n in self.args.sizes]
                first = cpus[0]
                if not first:
                    continue
                cpu10 = statistics.median(first)
                out.append(f"| {kind} | {op} | " + " | ".join(
                    "" if not xs else f"{statistics.median(xs):.4f} s"
                    + ("" if i == 0 else f" ({statistics.median(xs) / cpu10:.2f}x)")
                    for i, xs in enumerate(cpus)) + " |")
        out += ["", *(f"- FAILED: {f}" for f in self.failures)] if self.failures else []
        return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse, preflight, measure, report."""
    p = cli.parser(__doc__ or "")
    p.add_argument("--sizes", default="10,100,1000",
                   type=lambda s: [int(x) for x in s.split(",")], help="disks per store")
    p.add_argument("--generations", type=int, default=10, help="generations per disk")
    p.add_argument("--backends", default="file,s3,serve", type=lambda s: s.split(","),
                   help="any of file, s3, serve")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument("--write", type=Path, metavar="MD", help="write/replace the section")
    p.add_argument("--no-peers", action="store_true",
                   help="skip the rows without a local index")
    p.add_argument("--targets-only", action="store_true",
                   help="measure only the first and cold mounts and the commit")
    p.add_argument("--quiet-wait", type=float, default=5.0, metavar="S",
                   help="wait up to S s for a quiet machine before each measurement")
    args = p.parse_args(argv)
    if min(args.sizes) < 2 or args.runs < 1:
        p.error("--sizes must each be >= 2 and --runs >= 1")
    if not cli.preflight():
        return 1
    os.environ.pop("STICKYCI_STORE", None)
    bench = ScaleBench(args)
    try:
        bench.run()
    finally:
        unmount_leftovers(bench.run_dir)
    section = bench.report(cli.command_line("bench/scale.py", argv))
    print(section)
    if args.write:
        write_section(args.write, "scale", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
