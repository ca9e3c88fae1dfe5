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
import datetime
import json
import logging
import math
import os
import platform
import random
import resource
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stickyci import disks
from stickyci.errors import NotAMount, StickyError

MB = 1_000_000
KEY = "bench"
DEFAULT_WORK = Path("/var/tmp/stickyci-bench")
RESTIC_PASSWORD = "stickyci-bench"  # a throwaway repo under the work dir; not a secret

# Bump when the generator's output changes, so stale cached trees are not reused.
GEN_VERSION = 1
# Counts at --scale 1; sizes are not scaled, so a smaller tree has the same file-size mix.
BASE_COUNTS = {"text": 16_000, "obj": 14_000, "meta": 3_200, "large": 28, "blob": 4}
N_CRATES = 48
APP_SIZE = 42_000_000
EPOCH_NS = 1_700_000_000 * 10**9

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


def log(msg: str) -> None:
    """Progress on stderr, so stdout carries only the Markdown report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Processes, files and the page cache


def run(cmd: str | Sequence[str], *, env: dict[str, str] | None = None,
        data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command (a string runs in bash with pipefail); raise with its stderr on failure."""
    argv = ["bash", "-o", "pipefail", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    proc = subprocess.run(argv, env=env, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{cmd!r} exited {proc.returncode}: {err}")
    return proc


def timed(cmd: str | Sequence[str], *, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one command, process start-up included (that is what a job pays)."""
    start = WATCH.begin()
    run(cmd, env=env)
    return WATCH.end() - start


class CpuWatch:
    """CPU time that processes other than this benchmark's used during a measurement.

    The machine may be shared (tests running next to the benchmark); this puts a number on it.
    Kernel threads (write-back, I/O completion) and hypervisor steal count as "other" too.
    """

    def __init__(self) -> None:
        self._busy = self._own = self._start = 0.0
        self._share = 0.0
        self._tick = os.sysconf("SC_CLK_TCK")
        self.quiet_wait = 0.0

    def _busy_total(self) -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / self._tick

    @staticmethod
    def _own_total() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def wait_quiet(self) -> None:
        """Wait (up to ``quiet_wait`` s) until other processes use < 10% of the CPUs; this
        process is idle meanwhile, so all busy time is theirs."""
        deadline = time.perf_counter() + self.quiet_wait
        ncpu = os.cpu_count() or 1
        waited = False
        while time.perf_counter() < deadline:
            busy = self._busy_total()
            time.sleep(0.5)
            if (self._busy_total() - busy) / (0.5 * ncpu) < 0.10:
                break
            if not waited:
                log("  waiting for other processes to quiet down before measuring ...")
                waited = True

    def begin(self) -> float:
        """Start a measurement; returns ``time.perf_counter()``."""
        self.wait_quiet()
        self._busy, self._own = self._busy_total(), self._own_total()
        self._start = time.perf_counter()
        return self._start

    def end(self) -> float:
        """End a measurement; returns ``time.perf_counter()``."""
        now = time.perf_counter()
        wall = now - self._start
        other = (self._busy_total() - self._busy) - (self._own_total() - self._own)
        # /proc/stat counts in clock ticks (10 ms): too coarse to say anything about shorter
        # measurements, which are then taken as undisturbed.
        self._share = (max(0.0, other) / (wall * (os.cpu_count() or 1)) if wall >= 0.2
                       else 0.0)
        return now

    @property
    def other_share(self) -> float:
        """Other processes' CPU during the last measurement, as a share of all CPUs."""
        return self._share


WATCH = CpuWatch()


def sync_seconds() -> float:
    """How long ``sync`` takes: the write-back a tool left behind, for the ``+ sync`` column."""
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def du_bytes(path: Path) -> int:
    """Apparent size of a tree (``du -sb``), what a store or archive occupies."""
    return int(run(["du", "-sb", str(path)]).stdout.split()[0])


def remove(path: Path) -> None:
    """Delete a file or tree if present; refuse to delete through a live mount."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        if mounts_under(path, include_self=True):
            raise RuntimeError(f"refusing to delete {path}: something is mounted inside it")
        shutil.rmtree(path)
    else:
        path.unlink()


def mounts_under(root: Path, *, include_self: bool = False) -> list[str]:
    """Mount points inside ``root``, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    prefix = str(root).rstrip("/") + "/"
    return sorted((p for p in points
                   if p.startswith(prefix) or (include_self and p == str(root))), reverse=True)


def unmount_leftovers(root: Path) -> None:
    """Last resort for mounts a killed earlier run left behind (normal runs unmount via the API)."""
    for point in mounts_under(root):
        log(f"unmounting leftover mount {point}")
        subprocess.run(["umount", "-l", point], check=False)


def settle(cache: Path, since: float) -> float:
    """Wait for deletions stickyci left running in the background under ``cache`` (an overlay's
    upper dir goes to ``mounts/.trash`` and a detached ``rm`` deletes it), so they do not run
    into the next measurement. Returns about how long they ran after ``since`` (0: done)."""
    trash = cache / "mounts" / ".trash"
    if not (trash.is_dir() and any(trash.iterdir())):
        return 0.0
    deadline = time.perf_counter() + 600
    while trash.is_dir() and any(trash.iterdir()):
        if time.perf_counter() > deadline:
            log(f"WARNING: {trash} is still not empty after 10 minutes")
            break
        time.sleep(0.02)
    return time.perf_counter() - since


def drop_caches() -> bool:
    """Write back and drop the page cache, so the next read comes from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        log(f"cannot drop the page cache ({exc.strerror}); 'cold' figures are not cold")
        return False
    return True


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` for everything under ``root``: stickyci's own tree walk."""
    from stickyci.snapshot.scan import walk as tree_walk

    return tree_walk(str(root))


def read_tree(root: Path) -> None:
    """Read every file once, so a 'warm' measurement really starts with the data cached."""
    for rel, st in walk(root):
        if stat.S_ISREG(st.st_mode):
            fd = os.open(root / rel, os.O_RDONLY)
            try:
                while os.read(fd, 1 << 20):
                    pass
            finally:
                os.close(fd)


@dataclass(slots=True)
class TreeStats:
    """What a tree holds: regular files and their bytes, dirs, symlinks, the largest file."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    largest: int = 0

    @classmethod
    def of(cls, root: Path) -> TreeStats:
        """Count a tree."""
        out = cls()
        for _, st in walk(root):
            if stat.S_ISREG(st.st_mode):
                out.files += 1
                out.bytes += st.st_size
                out.largest = max(out.largest, st.st_size)
            elif stat.S_ISDIR(st.st_mode):
                out.dirs += 1
            elif stat.S_ISLNK(st.st_mode):
                out.symlinks += 1
        return out

    def summary(self) -> str:
        """One line for the report."""
        return (f"{self.files:,} files, {self.bytes / MB:,.0f} MB, {self.dirs:,} dirs, "
                f"{self.symlinks:,} symlinks, largest file {self.largest / MB:.1f} MB")


# --------------------------------------------------------------------------------------------
# The generated data set: a build tree, deterministic from a seed

SYLLABLES = ("core", "pack", "store", "net", "http", "json", "sync", "time", "hash", "tree",
             "io", "fs", "log", "cli", "test", "util", "derive", "macro", "proto", "cache",
             "disk", "ci", "build", "graph")
WORDS = ("fn", "let", "mut", "pub", "struct", "impl", "return", "if", "else", "match", "for",
         "in", "while", "use", "self", "Self", "Option", "Result", "Vec", "String", "u64",
         "usize", "&", "->", "=>", "::", "(", ")", "{", "}", "=", "+", "==", "Ok", "Err",
         "Some", "None", "0", "1", "len()", "clone()", "?")
MODS = ("lib", "parse", "codec", "net", "util", "tests")
ELF_HEADER = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x01\x00\x3e\x00\x01" + bytes(43)


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One entry of the generated tree."""

    path: str
    kind: str  # text, meta, obj, large, app, blob or symlink
    size: int
    crate: int
    mode: int = 0o644
    target: str = ""


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    # Build trees have many small files and few big ones: log-uniform sizes give that shape.
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _crate(i: int) -> str:
    return f"{SYLLABLES[i % len(SYLLABLES)]}-{SYLLABLES[(i * 7 + 3) % len(SYLLABLES)]}{i}"


def plan_tree(seed: int, scale: float) -> list[FileSpec]:
    """The entries of the generated tree. Each kind has its own stream of random numbers, so a
    scaled-down tree is a prefix of each kind of the full one."""

    def count(kind: str) -> int:
        return max(1, round(BASE_COUNTS[kind] * scale))

    specs: list[FileSpec] = []
    rng = random.Random(f"{seed}:text")
    exts = ("rs", "rs", "rs", "rs", "rs", "rs", "c", "h", "py", "toml")
    for i in range(count("text")):
        c = i % N_CRATES
        sub = rng.choice(("", "", "imp/", "detail/"))
        specs.append(FileSpec(f"src/{_crate(c)}/src/{rng.choice(MODS)}/{sub}f{i:05d}."
                              f"{rng.choice(exts)}", "text", _log_uniform(rng, 200, 40_000), c))
    rng = random.Random(f"{seed}:obj")
    for i in range(count("obj")):
        c = i % N_CRATES
        specs.append(FileSpec(f"target/debug/incremental/{_crate(c)}-{c:04x}/s-{i % 7}/"
                              f"{rng.getrandbits(32):08x}-cgu.{i:05d}.o", "obj",
                              _log_uniform(rng, 500, 160_000), c))
    rng = random.Random(f"{seed}:meta")
    for i in range(count("meta")):
        c = i % N_CRATES
        name = rng.choice(("dep-lib", "lib.json", "invoked.timestamp", "output.d"))
        specs.append(FileSpec(f"target/debug/.fingerprint/{_crate(c)}-{i // N_CRATES:04x}/"
                              f"{name}-{i:05d}", "meta", _log_uniform(rng, 60, 6_000), c))
    rng = random.Random(f"{seed}:large")
    for i in range(count("large")):
        c = i % N_CRATES
        ext = ("rlib", "so", "a")[i % 3]
        name = f"lib{_crate(c)}-{rng.getrandbits(64):016x}.{ext}"
        specs.append(FileSpec(f"target/debug/deps/{name}", "large",
                              _log_uniform(rng, 3 << 20, 48 << 20), c,
                              0o755 if ext == "so" else 0o644))
        specs.append(FileSpec(f"target/debug/lib{_crate(c)}-{i}.{ext}", "symlink", 0, c,
                              target=f"deps/{name}"))
    # The ~42 MB binary the incremental change replaces (like cargo in the Rust toolchain).
    specs.append(FileSpec("target/release/app", "app", APP_SIZE, N_CRATES, 0o755))
    specs.append(FileSpec("target/debug/app", "symlink", 0, 0, target="../release/app"))
    rng = random.Random(f"{seed}:blob")
    for i in range(count("blob")):
        specs.append(FileSpec(f"assets/pack{i}.bin", "blob", _log_uniform(rng, 4 << 20, 24 << 20),
                              0))
    return specs


class Content:
    """File bytes for a spec. Randomness comes from ``random.Random`` seeded per file (so the
    tree is reproducible); compressibility comes from repeating per-crate material."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._segments: dict[int, list[bytes]] = {}
        self._lines: dict[int, list[bytes]] = {}

    def segments(self, crate: int) -> list[bytes]:
        """Instruction-like byte runs shared by a crate's objects: a small 'opcode' alphabet."""
        if crate not in self._segments:
            rng = random.Random(f"{self.seed}:segments:{crate}")
            ops = [rng.randbytes(rng.randint(1, 4)) for _ in range(64)]
            self._segments[crate] = [b"".join(rng.choices(ops, k=rng.randint(4, 24)))
                                     for _ in range(512)]
        return self._segments[crate]

    def lines(self, crate: int) -> list[bytes]:
        """Source lines shared by a crate's files: keywords, identifiers, comments."""
        if crate not in self._lines:
            rng = random.Random(f"{self.seed}:lines:{crate}")
            idents = ["_".join(rng.choices(SYLLABLES, k=rng.randint(1, 3)))
                      + rng.choice(("", "", str(rng.randint(0, 99)))) for _ in range(300)]
            vocab = [*WORDS, *idents]
            prose = [*idents, "the", "a", "is", "of", "when", "returns", "not", "if", "every"]
            out = []
            for _ in range(1500):
                indent = " " * (4 * rng.randint(0, 3))
                if rng.random() < 0.12:
                    body = "// " + " ".join(rng.choices(prose, k=rng.randint(3, 12)))
                else:
                    body = " ".join(rng.choices(vocab, k=rng.randint(2, 12)))
                    body += rng.choice((";", ";", ",", " {", "}", ""))
                out.append(f"{indent}{body}\n".encode())
            self._lines[crate] = out
        return self._lines[crate]

    def make(self, spec: FileSpec) -> bytes:
        """The bytes of one file."""
        rng = random.Random(f"{self.seed}:{spec.path}")
        if spec.kind == "text":
            head = b"// SPDX-License-Identifier: MIT OR Apache-2.0\n"
            return (head + b"".join(rng.choices(self.lines(spec.crate),
                                                k=spec.size // 24 + 8)))[:spec.size]
        if spec.kind == "meta":
            crate = _crate(spec.crate)
            rows = [f"{crate}/src/{rng.choice(MODS)}/f{rng.randrange(16000):05d}.rs: "
                    f"{rng.getrandbits(64):016x}\n" for _ in range(spec.size // 40 + 2)]
            return "".join(rows).encode()[:spec.size]
        if spec.kind == "blob":
            return rng.randbytes(spec.size)  # already-compressed assets: incompressible
        return self._object(rng, spec.size, self.segments(spec.crate))

    @staticmethod
    def _object(rng: random.Random, size: int, segments: list[bytes]) -> bytes:
        # Object-file-like: shared instruction runs with random operands between them, some
        # zero padding and mangled symbol names. Compresses about 3x with zstd -3, like real
        # objects and binaries (cargo: 2.8x, libcore.rlib: 3.4x).
        out = bytearray(ELF_HEADER)
        choices, randbytes, bits = rng.choices, rng.randbytes, rng.getrandbits
        while len(out) < size:
            for seg in choices(segments, k=16):
                out += seg
                out += randbytes(4 + bits(3))
            if bits(2) == 0:
                out += bytes(8 << bits(2))
            if bits(1) == 0:
                out += b"_ZN4core3ptr13drop_in_place17h%sE\x00" % randbytes(8).hex().encode()
        del out[size:]
        return bytes(out)


def generate_tree(root: Path, seed: int, scale: float) -> None:
    """Write the generated tree into ``root`` (an empty directory)."""
    content = Content(seed)
    made: set[str] = set()
    specs = plan_tree(seed, scale)
    for i, spec in enumerate(specs):
        path = root / spec.path
        parent = os.path.dirname(spec.path)
        if parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(parent)
        if spec.kind == "symlink":
            os.symlink(spec.target, path)
            continue
        path.write_bytes(content.make(spec))
        os.chmod(path, spec.mode)
        # Fixed mtimes: the tree is the same bytes and metadata on every machine.
        t = EPOCH_NS + i * 10**9
        os.utime(path, ns=(t, t))
        if i and i % 5000 == 0:
            log(f"  generated {i:,} of {len(specs):,} entries")


@dataclass(slots=True)
class Dataset:
    """A cached source tree the benchmark reads."""

    key: str
    title: str
    root: Path
    description: str
    stats: TreeStats


def _cached_tree(work: Path, name: str, describe: str,
                 build: Callable[[Path], object]) -> tuple[Path, TreeStats]:
    """``work/data/name``, built once by ``build(tmp)``; the .json beside it marks it complete."""
    data = work / "data"
    root, meta = data / name, data / f"{name}.json"
    if root.is_dir() and meta.is_file():
        log(f"using cached data set {root}")
        return root, TreeStats(**json.loads(meta.read_text())["stats"])
    log(f"building data set {root} ({describe}) ...")
    remove(root)
    tmp = data / f".tmp-{name}"
    remove(tmp)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    build(tmp)
    seconds = time.perf_counter() - start
    os.rename(tmp, root)
    stats = TreeStats.of(root)
    meta.write_text(json.dumps({"stats": asdict(stats), "seconds": seconds,
                                "describe": describe}))
    log(f"built {root} in {seconds:.1f} s: {stats.summary()}")
    return root, stats


def generated_dataset(work: Path, seed: int, scale: float) -> Dataset:
    """The generated build tree for ``seed`` and ``scale``, generated once and cached."""
    name = f"generated-seed{seed}-scale{scale:g}-v{GEN_VERSION}"
    root, stats = _cached_tree(work, name, f"seed {seed}, scale {scale:g}",
                               lambda tmp: generate_tree(tmp, seed, scale))
    key = "generated" if scale == 1 else f"generated-scale{scale:g}"
    desc = (f"generated by `bench/disks.py` (seed {seed}, scale {scale:g}): Rust/C-like sources, "
            "object files and fingerprints, rlib/so/a archives of 3-48 MB, a 42 MB binary and "
            "incompressible asset blobs; objects and binaries compress about 3x with zstd -3")
    return Dataset(key, f"generated build tree (seed {seed}, scale {scale:g})", root, desc, stats)


def real_source(override: str | None) -> tuple[str, Path, str]:
    """The real tree to copy: the Rust toolchain (``rustc --print sysroot``), else Python's lib."""
    if override:
        path = Path(override).resolve()
        return path.name, path, f"{path}"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        version = subprocess.run(["rustc", "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
        if sysroot and Path(sysroot).is_dir():
            return "rust-toolchain", Path(sysroot), f"the Rust toolchain at {sysroot} ({version})"
    lib = Path(sys.prefix) / "lib"
    return "python-lib", lib, f"the Python installation's lib dir {lib} (Python {sys.version})"


def real_dataset(work: Path, override: str | None) -> Dataset:
    """A real tree from this machine, copied once (``cp -a``) so every tool reads local data."""
    kind, src, what = real_source(override)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(src).strip("/"))
    root, stats = _cached_tree(work, f"real-{slug}", str(src),
                               lambda tmp: run(["cp", "-a", f"{src}/.", f"{tmp}/"]))
    return Dataset(f"real-{kind}", f"real tree: {kind}", root, f"{what}, copied with `cp -a`",
                   stats)


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


class Bench:
    """Runs every operation on one data set and keeps the rows."""

    def __init__(self, args: argparse.Namespace, dataset: Dataset, work: Path) -> None:
        self.args = args
        self.ds = dataset
        self.run_dir = work / "run"
        self.tree = self.run_dir / "tree"
        self.mnt = self.run_dir / "mnt"
        self.saved_store = self.run_dir / "saved-store"
        self.tar_out = self.run_dir / "full.tar.zst"
        self.restic_repo = self.run_dir / "restic"
        self.restic_cache = self.run_dir / "restic-cache"
        self.cp_out = self.run_dir / "cp-out"
        self.warm_cache = self.run_dir / "cache-warm"
        self.rows: dict[tuple[str, str], Row] = {}
        self.facts: dict[str, Any] = {}
        self.cold_ok = True
        self.snapshot = ""
        self.disk_peak = 0

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

    def sample_disk(self) -> None:
        """Note the run dir's disk use (allocated, mounts skipped) at a moment it may peak."""
        out = subprocess.run(["du", "-sx", "-B1", str(self.run_dir)], capture_output=True,
                             text=True, check=False).stdout.split()
        if out:
            self.disk_peak = max(self.disk_peak, int(out[0]))

    def restic_env(self, repo: Path | None = None) -> dict[str, str]:
        """restic's environment: password, repository and a cache dir under the run dir."""
        return {**os.environ, "RESTIC_PASSWORD": RESTIC_PASSWORD,
                "RESTIC_REPOSITORY": str(repo or self.restic_repo),
                "RESTIC_CACHE_DIR": str(self.restic_cache)}

    def cold(self) -> None:
        """Drop the page cache before a cold measurement."""
        self.cold_ok = drop_caches() and self.cold_ok

    def check_tree(self, root: Path, what: str) -> None:
        """Warn if a restored tree does not hold what the data set holds (counted, not timed)."""
        got, want = TreeStats.of(root), self.ds.stats
        if (got.files, got.bytes, got.symlinks) != (want.files, want.bytes, want.symlinks):
            log(f"WARNING: {what} restored {got.summary()}; expected {want.summary()}")
            self.facts.setdefault("mismatches", []).append(what)

    @contextlib.contextmanager
    def mounted(self, path: Path, strategy: str, store: Path,
                cache: Path) -> Iterator[tuple[disks.MountResult, float]]:
        """Mount ``KEY`` at ``path``; yield the result and the mount's wall time. Always leaves
        ``path`` unmounted: after a commit the record is gone, otherwise the API unmounts it."""
        os.environ["STICKYCI_CACHE_DIR"] = str(cache)
        path.mkdir(parents=True, exist_ok=True)
        start = WATCH.begin()
        result = disks.mount(KEY, path, strategy=strategy, store_url=f"file://{store}")
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

    def setup(self) -> None:
        """A clean run dir with a working copy of the data set (restic and tar read it)."""
        unmount_leftovers(self.run_dir)
        remove(self.run_dir)
        self.run_dir.mkdir(parents=True)
        free = shutil.disk_usage(self.run_dir).free
        if free < 6 * self.ds.stats.bytes:
            log(f"WARNING: {free / MB:,.0f} MB free under {self.run_dir}; a run needs about "
                f"{6 * self.ds.stats.bytes / MB:,.0f} MB")
        log(f"copying the data set to {self.tree}")
        run(["cp", "-a", str(self.ds.root), str(self.tree)])

    def teardown(self) -> None:
        """Remove everything the run wrote, unless ``--keep``."""
        unmount_leftovers(self.run_dir)
        if not self.args.keep:
            remove(self.run_dir)

    def attempt(self, op: str, tool: str, measure: Callable[[], object]) -> None:
        """Run one measurement; redo it (at most twice) when other processes took more than
        ``--max-other-cpu`` of the CPUs meanwhile, so a busy neighbour does not set the median."""
        for tries in range(3):
            try:
                measure()
            except (RuntimeError, OSError, StickyError) as exc:
                # One tool failing (a peer, or the CLI while src/ is being edited) must not
                # lose the other measurements; the report lists the failure.
                msg = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
                log(f"  FAILED: {tool} ({op}): {msg}")
                self.facts.setdefault("failures", []).append(f"{tool} ({op}): {msg}")
                return
            row = self.rows[(op, tool)]
            if row.other_cpu[-1] <= self.args.max_other_cpu or tries == 2:
                return
            log(f"  other processes used {row.other_cpu[-1]:.0%} of the CPUs; measuring again")
            row.retried += 1
            n = len(row.seconds) - 1
            for samples in (row.seconds, row.synced, row.other_cpu, row.stored, row.background):
                del samples[n:]

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
        """Cold restore: page cache dropped, empty base cache (and empty restic cache)."""
        log("== cold restore (page cache dropped before each)")
        for i in range(self.args.runs):
            log(f" run {i + 1}/{self.args.runs}")
            # Both start from an empty cache; the overlay run's stays, as the base of the warm
            # and incremental runs.
            self.attempt(RESTORE, ST_MOUNT_COPY, lambda: self.restore_stickyci("copy"))
            self.attempt(RESTORE, ST_MOUNT_OVL, lambda: self.restore_stickyci("overlay"))
            if not self.args.stickyci_only:
                self.attempt(RESTORE, TAR_RESTORE, self.restore_tar)
                self.attempt(RESTORE, RESTIC_RESTORE, self.restore_restic)
                self.attempt(RESTORE, CP, self.restore_cp)

    @property
    def target(self) -> Path:
        """Where restores go."""
        return self.run_dir / "restore"

    def restore_stickyci(self, strategy: str) -> None:
        """A mount with an empty base cache: the snapshot is restored from the store."""
        tool = ST_MOUNT_OVL if strategy == "overlay" else ST_MOUNT_COPY
        cache = self.warm_cache
        remove(cache)
        remove(self.target)
        self.target.mkdir()
        self.cold()
        with self.mounted(self.target, strategy, self.saved_store, cache) as (res, seconds):
            synced = seconds + sync_seconds()
            self.snapshot = res.snapshot
            if res.base_cached:
                log("WARNING: the cold mount found its base cached")
            self.check_tree(self.target, tool)
            self.sample_disk()
        self.record(RESTORE, tool, "cold", seconds, synced=synced)

    def restore_tar(self) -> None:
        """``zstd -d | tar -x`` of the full save's archive."""
        remove(self.target)
        self.target.mkdir()
        self.cold()
        seconds = timed(f"zstd -d -c -q {shlex.quote(str(self.tar_out))} "
                        f"| tar -x -C {shlex.quote(str(self.target))}")
        self.record(RESTORE, TAR_RESTORE, "cold", seconds, synced=seconds + sync_seconds())
        self.check_tree(self.target, TAR_RESTORE)
        remove(self.target)

    def restore_restic(self) -> None:
        """``restic restore latest`` with an empty restic cache."""
        remove(self.target)
        remove(self.restic_cache)
        self.cold()
        seconds = timed(["restic", "restore", "latest", "-q", "--target", str(self.target)],
                        env=self.restic_env())
        self.record(RESTORE, RESTIC_RESTORE, "cold", seconds, synced=seconds + sync_seconds())
        # restic restores under the absolute path it backed up.
        self.check_tree(self.target / self.tree.relative_to("/"), RESTIC_RESTORE)
        remove(self.target)

    def restore_cp(self) -> None:
        """``cp -a`` back from the full save's copy."""
        remove(self.target)
        self.cold()
        seconds = timed(["cp", "-a", str(self.cp_out), str(self.target)])
        self.record(RESTORE, CP, "cold", seconds, synced=seconds + sync_seconds())
        self.check_tree(self.target, CP)
        remove(self.target)

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
        before = du_bytes(store)
        mnt = self.fresh_mnt()
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


def _secs(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"


def _mb(x: float) -> str:
    return f"{x / MB:,.1f}" if x >= MB else f"{x / MB:.3f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


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
            ratio = "(reference)"
        elif ref is not None and not row.tool.startswith(("stickyci", "python3 -m stickyci")):
            ratio = _ratio(ref.median, row.median)
        else:
            ratio = ""
        stored = _mb(statistics.median(row.stored)) if row.stored else ""
        lines.append(f"| {row.op} | {row.tool} | {row.cache} | {_secs(row.median)} | "
                     f"{_secs(min(row.seconds))}-{_secs(max(row.seconds))} | "
                     f"{_secs(statistics.median(row.synced))} | {size / MB / row.median:,.0f} | "
                     f"{stored} | {ratio} | {statistics.median(row.other_cpu):.0%} |")
    return "\n".join(lines)


def size_table(bench: Bench, sizes: list[tuple[str, int]]) -> str:
    """Bytes kept after the full save, against the tree and against the stickyci store."""
    tree = bench.ds.stats.bytes
    lines = ["| what | bytes | MB | tree / this | stickyci / this |", "|---|---:|---:|---:|---:|"]
    ours = sizes[0][1]
    for name, n in sizes:
        lines.append(f"| {name} | {n:,} | {_mb(n)} | {_ratio(tree, n)} | {_ratio(ours, n)} |")
    return "\n".join(lines)


def incremental_table(bench: Bench) -> str:
    """What the incremental save stored, against the compressed size of what changed."""
    f = bench.facts
    new_zst, files_zst = f["changed_new_zst"], f["changed_files_zst"]
    lines = ["| what | bytes | MB | / changed bytes (zstd -3) | / changed files (zstd -3) |",
             "|---|---:|---:|---:|---:|",
             f"| changed bytes: the appended KiBs + the 50 MiB file, zstd -3 | {new_zst:,} | "
             f"{_mb(new_zst)} | 1.00x | {_ratio(new_zst, files_zst)} |",
             f"| changed files, whole new content ({f['changed_files_bytes'] / MB:,.1f} MB), "
             f"zstd -3 | {files_zst:,} | {_mb(files_zst)} | {_ratio(files_zst, new_zst)} | 1.00x |"]
    for strategy in ("overlay", "copy"):
        n = f.get(f"inc_stored_bytes_{strategy}")
        if n is not None:
            lines.append(f"| stickyci commit ({strategy}): pack bytes written | {n:,} | {_mb(n)} "
                         f"| {_ratio(n, new_zst)} | {_ratio(n, files_zst)} |")
    for tool in (ST_INC_OVL, ST_INC_COPY, RESTIC_INC, TAR_INC):
        row = bench.rows.get((INCR, tool))
        if row and row.stored:
            n = int(statistics.median(row.stored))
            what = "archive size" if tool == TAR_INC else "store growth (`du -sb`)"
            lines.append(f"| {tool}: {what} | {n:,} | {_mb(n)} | {_ratio(n, new_zst)} | "
                         f"{_ratio(n, files_zst)} |")
    return "\n".join(lines)


@dataclass(slots=True)
class Target:
    """A target from the issue and how the run did against it."""

    name: str
    measured: float | None
    limit: float | None
    unit: str

    def verdict(self) -> tuple[str, str]:
        """PASS or MISS, and by how much."""
        if self.measured is None or self.limit is None:
            return "n/a", "peer not measured"
        ratio = self.measured / self.limit if self.limit else math.inf
        if self.measured <= self.limit:
            return "PASS", f"{ratio:.2f}x of the limit"
        return "MISS", f"{ratio:.2f}x the limit ({self.measured - self.limit:+,.3f} {self.unit})"


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
        Target("cold mount (overlay) <= tar+zstd extraction", med(RESTORE, ST_MOUNT_OVL),
               med(RESTORE, TAR_RESTORE), "s"),
        Target("cold mount (copy) <= tar+zstd extraction", med(RESTORE, ST_MOUNT_COPY),
               med(RESTORE, TAR_RESTORE), "s"),
        Target("incremental commit (overlay) <= 0.5 s", med(INCR, ST_INC_OVL), 0.5, "s"),
        Target("incremental commit (copy) <= 1.5 s", med(INCR, ST_INC_COPY), 1.5, "s"),
        Target("incremental stored <= 1.2x changed bytes (zstd -3)",
               None if stored is None else stored / MB, scaled(new_zst, 1.2 / MB), "MB"),
        Target("store size <= restic repository", size["stickyci store (`du -sb`)"] / MB,
               scaled(size.get("restic repository (`du -sb`)"), 1 / MB), "MB"),
    ]


def target_table(found: list[Target]) -> str:
    """PASS/MISS per target."""
    lines = ["| target | measured | limit | result | margin |", "|---|---:|---:|---|---|"]
    for t in found:
        verdict, margin = t.verdict()
        m = "" if t.measured is None else f"{t.measured:,.3f} {t.unit}"
        lim = "" if t.limit is None else f"{t.limit:,.3f} {t.unit}"
        lines.append(f"| {t.name} | {m} | {lim} | **{verdict}** | {margin} |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """The machine and software the figures come from."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                   cpu)
    mem = 0
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024

    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True,
                                  check=False).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    vm = []
    balloon = Path("/sys/bus/virtio/drivers/virtio_balloon")
    if balloon.is_dir() and any(p.name.startswith("virtio") for p in balloon.iterdir()):
        vm.append("virtio-balloon")
    with contextlib.suppress(OSError, ValueError):
        if int(Path("/sys/kernel/mm/damon/admin/kdamonds/nr_kdamonds").read_text()) > 0:
            vm.append("DAMON")
    return {"cpu": cpu, "nproc": str(os.cpu_count()), "ram": f"{mem / 2**30:.1f} GiB",
            "vm": ", ".join(vm),
            "kernel": platform.release(), "python": platform.python_version(),
            "restic": out(["restic", "version"]),
            "zstd": out(["zstd", "--version"]).strip("* ").replace(", by Yann Collet", ""),
            "tar": out(["tar", "--version"])}


def src_fingerprint() -> str:
    """A digest of stickyci's source files, to notice src/ changing during a run."""
    import hashlib

    import stickyci

    h = hashlib.sha256()
    for f in sorted(Path(stickyci.__file__).resolve().parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def stickyci_revision() -> str:
    """The git revision of the stickyci source the run imported, and whether src/ was dirty."""
    import stickyci

    src = Path(stickyci.__file__).resolve().parent
    rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "."],
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"{rev}{' + uncommitted changes in src/' if dirty else ''}"


def report(bench: Bench, command: str, sizes: list[tuple[str, int]], started: str,
           revision: str) -> str:
    """The Markdown section for this data set."""
    m = machine()
    fs = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(bench.run_dir.parent)],
                        capture_output=True, text=True, check=False).stdout.split()
    restic_cfg = bench.facts.get("restic_config", {})
    notes = [
        f"- **Data set:** {bench.ds.description}. {bench.ds.stats.summary()}.",
        f"- **Machine:** {m['cpu']}, {m['nproc']} CPUs, {m['ram']} RAM, Linux {m['kernel']}; "
        f"work dir `{bench.run_dir.parent}` on {' on '.join(fs) or '?'}."
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
    ]
    if bench.facts.get("src_changed"):
        notes.append("- **Warning:** stickyci's source changed while the benchmark ran; the CLI "
                     "rows may have run newer code than the in-process rows.")
    other = [x for row in bench.rows.values() for x in row.other_cpu]
    if other and max(other) > 0.1:
        notes.append(f"- **Noise:** other processes used up to {max(other):.0%} of the CPUs "
                     "during some measurements (column *other CPU*, median per row); those "
                     "figures are pessimistic.")
    retried = [f"{row.tool} ({row.op}) x{row.retried}" for row in bench.rows.values()
               if row.retried]
    if retried:
        notes.append(f"- **Re-measured** because other processes used more than "
                     f"{bench.args.max_other_cpu:.0%} of the CPUs meanwhile: "
                     f"{', '.join(retried)}.")
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


DOC_HEADER = """# Benchmarks

Produced by `bench/disks.py`: every figure below comes from one invocation on the data set named
in its section, with stickyci and its peers run back to back on the same local copy of the data.
Each section is replaced in place when the benchmark is re-run with `--write`.

How the operations are measured:

- **full save**: stickyci mounts a new key on an empty store, the tree is copied in (not timed),
  the page cache is written back (`sync`, not timed), then only `commit` is timed: through the
  Python API for the overlay and copy strategies, and as a `python3 -m stickyci disk commit`
  process (interpreter start-up included). The peers read the same tree, already in the page
  cache: `tar -C DIR -cf - . | zstd -T0 -3`, `restic backup` into a fresh repository (restic
  0.14 has no `--no-scan`; its scanner runs alongside), and `cp -a`.
- **cold restore**: `sync; echo 3 > /proc/sys/vm/drop_caches` before each one. stickyci mounts
  with an empty base cache (`STICKYCI_CACHE_DIR` emptied), so the mount restores the snapshot
  from the store; restic restores with an empty local cache (`RESTIC_CACHE_DIR` wiped).
- **warm mount**: the snapshot's base is already in stickyci's base cache.
- **incremental save**: each run starts from a copy of the full save's store (and restic
  repository); the disk is mounted with its base cached, the change is applied (not timed) and
  the commit is timed. restic backs up the changed tree with the full save as its parent
  snapshot; tar+zstd archives the whole changed tree again.
- **+ sync s** is the wall time plus a `sync` run right after: stickyci fsyncs its packs, the
  peers leave their writes in the page cache, so this column compares durable saves.
- **stickyci / tool** is the stickyci reference row's median over the tool's median: below 1.00x
  stickyci is faster. MB/s is the tree's size over the wall time.
- **other CPU** is the CPU time processes other than the benchmark's (kernel threads included)
  used during the measurement, as a share of all CPUs. Before each measurement the benchmark
  waits (up to 60 s) for the machine to be idle, and it measures again (at most twice) when that
  share went over 25%.
- Deletions stickyci leaves running in the background after a commit are waited for (not
  timed) before the next measurement; their duration is reported.
"""


def write_docs(path: Path, key: str, section: str) -> None:
    """Write or replace this data set's section of the benchmarks document."""
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = path.read_text() if path.exists() else ""
    # The header is this benchmark's too: rewrite it, keep the other data sets' sections.
    marker = text.find("<!-- bench:")
    text = DOC_HEADER + ("\n" + text[marker:] if marker >= 0 else "")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log(f"wrote the {key} section of {path}")


# --------------------------------------------------------------------------------------------


def add_noise_options(p: argparse.ArgumentParser) -> None:
    """``--max-other-cpu`` and ``--quiet-wait``: how a benchmark copes with a shared machine."""
    p.add_argument("--max-other-cpu", type=float, default=0.25, metavar="SHARE",
                   help="redo a measurement (at most twice) when processes other than the "
                   "benchmark used more than this share of the CPUs during it (default 0.25)")
    p.add_argument("--quiet-wait", type=float, default=60, metavar="S",
                   help="before each measurement, wait up to S seconds for other processes "
                   "to stop using the CPUs (default 60; 0: never wait)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("generated", "real"), default="generated",
                   help="generated build tree (default) or a real tree from this machine")
    p.add_argument("--scale", type=float, default=1.0,
                   help="file counts of the generated tree (1.0: ~1 GB, ~33k files)")
    p.add_argument("--seed", type=int, default=42, help="seed of the generated tree and change")
    p.add_argument("--real-source", help="tree to copy for --dataset real (default: the Rust "
                   "toolchain, else Python's lib dir)")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                   help=f"cached data sets and scratch space (default {DEFAULT_WORK})")
    p.add_argument("--write", type=Path, metavar="MD",
                   help="write/replace this data set's section in a Markdown file")
    p.add_argument("--stickyci-only", action="store_true", help="skip the peers (profiling)")
    p.add_argument("--no-cli", action="store_true", help="skip the CLI commit measurement")
    p.add_argument("--keep", action="store_true", help="keep <work dir>/run afterwards")
    add_noise_options(p)
    args = p.parse_args(argv)
    if args.runs < 1 or args.scale <= 0:
        p.error("--runs must be >= 1 and --scale > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="stickyci: %(message)s")
    if os.geteuid() != 0:
        log("this benchmark needs root: overlay mounts and dropping the page cache")
        return 2
    for tool in ("restic", "zstd", "tar", "du", "cp"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed (apt-get install {tool})")
            return 2
    command = "python3 " + shlex.join(sys.argv if argv is None else ["bench/disks.py", *argv])
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
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
        write_docs(args.write, dataset.key, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
