"""The data sets the benchmarks read: a generated build tree (deterministic from a seed), a real
tree from this machine, both cached under the work dir, and random content-addressed blobs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .fs import remove, walk
from .proc import REPO, log, run
from .report import MB

DEFAULT_WORK = Path("/var/tmp/stickyci-bench")
RESTIC_PASSWORD = "stickyci-bench"  # throwaway repos under the work dir; not a secret
# The canonical example the pipeline benchmarks run.
EXAMPLE_PIPELINE = REPO / "examples" / "monorepo" / "pipeline.yml"

# Bump when the generator's output changes, so stale cached trees are not reused.
GEN_VERSION = 1
# Counts at --scale 1; sizes are not scaled, so a smaller tree has the same file-size mix.
BASE_COUNTS = {"text": 16_000, "obj": 14_000, "meta": 3_200, "large": 28, "blob": 4}
N_CRATES = 48
APP_SIZE = 42_000_000
EPOCH_NS = 1_700_000_000 * 10**9


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
# The generated build tree

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
    desc = (f"generated by `bench/harness/datasets.py` (seed {seed}, scale {scale:g}): Rust/C-like "
            "sources, object files and fingerprints, rlib/so/a archives of 3-48 MB, a 42 MB "
            "binary and incompressible asset blobs; objects and binaries compress about 3x with "
            "zstd -3")
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
# Content-addressed blobs (the Bazel cache's objects)


@dataclass(frozen=True)
class Blobs:
    """Bodies of the objects, named by their sha256, and the files the Lua scripts read."""

    small_bin: Path      # every small body, concatenated
    small_idx: Path      # "<sha256> <offset> <length>" per line
    small_paths: Path    # "/cas/<sha256>" per line
    large_paths: Path
    large_dir: Path      # the large bodies, one file each, named by sha256
    small: list[str]
    large: list[str]
    small_bytes: int
    large_bytes: int


def make_blobs(work: Path, n_small: int, n_large: int, large_mib: int, seed: int) -> Blobs:
    """Random bodies (deterministic for a seed): 1-4 KiB small ones and ``large_mib`` large."""
    rng = random.Random(seed)
    small, small_bytes = [], 0
    with open(work / "small.bin", "wb") as blob, open(work / "small.idx", "w") as idx:
        for _ in range(n_small):
            body = rng.randbytes(rng.randint(1024, 4096))
            sha = hashlib.sha256(body).hexdigest()
            idx.write(f"{sha} {small_bytes} {len(body)}\n")
            blob.write(body)
            small.append(sha)
            small_bytes += len(body)
    large_dir = work / "large"
    large_dir.mkdir()
    large = []
    for _ in range(n_large):
        body = rng.randbytes(large_mib << 20)
        sha = hashlib.sha256(body).hexdigest()
        (large_dir / sha).write_bytes(body)
        large.append(sha)
    (work / "small.paths").write_text("".join(f"/cas/{s}\n" for s in small))
    (work / "large.paths").write_text("".join(f"/cas/{s}\n" for s in large))
    return Blobs(work / "small.bin", work / "small.idx", work / "small.paths",
                   work / "large.paths", large_dir, small, large, small_bytes,
                   n_large * (large_mib << 20))


def small_bodies(ds: Blobs) -> Iterator[tuple[str, bytes]]:
    """(sha256, body) of every small object."""
    blob = ds.small_bin.read_bytes()
    for line in ds.small_idx.read_text().splitlines():
        sha, off, length = line.split()
        yield sha, blob[int(off):int(off) + int(length)]
