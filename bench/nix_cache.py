#!/usr/bin/env python3
"""Nix binary cache: ``stickyci serve`` against a ``file://`` binary cache, five versions.

The real Nix (Debian's ``nix-bin``) builds five successive versions of a closure into a chroot
store, then, round after round, copies each version in turn (``nix copy --to``, which sends
only the store paths the cache does not hold yet) to three caches, interleaved, and
substitutes each version into an empty store from each of them:

- **stickyci**: ``stickyci serve`` over a fresh ``file://`` store, the cache
  ``http://127.0.0.1:PORT/nix/bench?compression=C`` (``--stickyci-compression``, zstd unless
  told: the server decompresses, blanks out store paths, chunks and deduplicates, compresses
  the chunks it lacks, signs narinfos with the cache's key);
- **file:// xz**: what ``nix copy --to file://DIR`` writes with Nix's default compression (xz),
  signed with ``secret-key=`` so that substitution checks signatures as it does from stickyci;
- **file:// zstd**: the same with ``?compression=zstd``.

The file caches are served to the substituters by nginx (static files, one worker per CPU).
Every version's upload and substitution time is measured, and the bytes each cache holds after
it (``du -sb`` of the store or the directory).

The closure (``--scale 1``: 6 store paths, ~100 MB of NARs) is generated: a libc, zlib,
openssl, a Python, Python packages and an app, each depending on those below it, with
object-file-like binaries (which embed their dependencies' store paths, as an RPATH does) and
source-like text. Each version bumps one package (a few of its files change, its version in its
name too), and every package above it is rebuilt against the new store path, as a dependency
bump does in nixpkgs: v2 openssl, v3 the app, v4 the Python packages, v5 zlib (all but libc).

The issue's goal: fewer bytes than the plain binary cache by at least 2x over the five
versions, at no worse than 1.5x its upload time::

    python3 bench/nix_cache.py --scale 0.2 --runs 1                  # smoke run
    python3 bench/nix_cache.py --runs 3 --write docs/benchmarks.md

Runs as root (Nix builds as root, without build users). Progress goes to stderr, the Markdown
report to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness import cli
from harness.datasets import Content, FileSpec
from harness.fs import du_bytes, remove
from harness.machine import machine, stickyci_revision
from harness.noise import WATCH
from harness.proc import first_line, free_port, log, run, started, tests_helpers, wait_http
from harness.profile import spying, top_inclusive, top_self
from harness.report import MB, Target, target_table, write_section

from stickyci.server.nix.spool import SPOOL_DIR

if TYPE_CHECKING:  # tests/ is importable once tests_helpers() ran
    from nix_helpers import Nix

KEY = "nix-cache"
CACHE = "bench"
SANDBOX_PATHS = "/bin /lib /lib64 /usr"
PLACEHOLDER = b"@@NIX-REFS@@"
ST, XZ, ZSTD = "stickyci", "file:// xz", "file:// zstd"
CACHES = (ST, XZ, ZSTD)
SLUG = {XZ: "xz", ZSTD: "zstd"}
UPLOAD, SUBST = "upload", "substitute"
COMPRESSION_NOTE = {
    "none": " (the server compresses the chunks it lacks after deduplicating, so Nix "
            "compressing every NAR first is work done twice: on loopback, or a link faster "
            "than Nix's zstd, sending NARs as they are is the quicker way; the bytes stored "
            "do not change)"}

# --------------------------------------------------------------------------------------------
# The closure


@dataclass(frozen=True)
class Group:
    """Files of one kind in a package: ``count`` files named ``pattern.format(i)``, sizes
    log-uniform in ``[lo, hi]`` bytes (at ``--scale 1``). Binaries (``.so``, ``bin/``) are
    object-like and embed the package's dependencies; the rest is source-like text."""

    pattern: str
    count: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Package:
    """One store path of the closure."""

    name: str
    deps: tuple[str, ...]
    groups: tuple[Group, ...]


PACKAGES = (
    Package("libc", (), (Group("lib/lib{}.so", 8, 300_000, 6_000_000),
                         Group("share/i18n/locale{}.txt", 200, 2_000, 60_000),
                         Group("include/h{}.h", 150, 1_000, 30_000))),
    Package("zlib", ("libc",), (Group("lib/libz{}.so", 1, 200_000, 200_000),
                                Group("include/z{}.h", 6, 2_000, 20_000))),
    Package("openssl", ("libc", "zlib"), (Group("lib/libcrypto{}.so", 1, 5_000_000, 5_000_000),
                                          Group("lib/libssl{}.so", 1, 1_000_000, 1_000_000),
                                          Group("bin/openssl{}", 1, 1_000_000, 1_000_000),
                                          Group("include/ssl{}.h", 100, 1_000, 40_000))),
    Package("python", ("libc", "zlib", "openssl"),
            (Group("bin/python{}", 1, 5_000_000, 5_000_000),
             Group("lib/dynload/m{}.so", 40, 50_000, 1_500_000),
             Group("lib/py/mod{}.py", 1200, 1_000, 60_000))),
    Package("pydeps", ("python", "openssl"), (Group("site/pkg{}.py", 800, 1_000, 60_000),
                                              Group("site/ext{}.so", 10, 300_000, 4_000_000))),
    Package("app", ("libc", "python", "pydeps"), (Group("bin/app{}", 1, 6_000_000, 6_000_000),
                                                  Group("share/app/m{}.py", 100, 1_000, 30_000))),
)
PKG = {p.name: p for p in PACKAGES}

# Version -> (the package bumped, how many of its files change). Version 1 is the first build.
BUMPS = {2: ("openssl", 3), 3: ("app", 3), 4: ("pydeps", 6), 5: ("zlib", 2)}


def file_sizes(pkg: Package, scale: float) -> dict[str, int]:
    """Every file of a package and its size, the same for the same package and scale. A
    group of many files scales by its number of files, a single file by its size."""
    out: dict[str, int] = {}
    for g in pkg.groups:
        rng = random.Random(f"{pkg.name}:{g.pattern}")
        if g.count > 1:
            n, lo, hi = max(1, round(g.count * scale)), g.lo, g.hi
        else:
            n, lo, hi = 1, max(1, round(g.lo * scale)), max(1, round(g.hi * scale))
        for i in range(n):
            out[g.pattern.format(i)] = round(lo * (hi / lo) ** rng.random())
    return out


def is_binary(pkg: Package, rel: str) -> bool:
    """Whether a file of ``pkg`` is object-like."""
    return rel.endswith(".so") or rel.startswith("bin/")


@dataclass
class Versions:
    """Which edit of each file each version holds: ``edits[v][pkg][rel]`` counts the bumps
    that changed the file; a package's version number counts its bumps."""

    scale: float
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    edits: dict[int, dict[str, dict[str, int]]] = field(default_factory=dict)
    bumps: dict[int, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def plan(cls, scale: float) -> Versions:
        """Plan the five versions."""
        out = cls(scale)
        out.sizes = {p.name: file_sizes(p, scale) for p in PACKAGES}
        edits = {p.name: dict.fromkeys(out.sizes[p.name], 0) for p in PACKAGES}
        bumps = dict.fromkeys(PKG, 0)
        out.edits[1] = {k: dict(v) for k, v in edits.items()}
        out.bumps[1] = dict(bumps)
        for v in range(2, 6):
            name, n = BUMPS[v]
            rng = random.Random(f"bump:{v}")
            files = sorted(out.sizes[name])
            binaries = [f for f in files if is_binary(PKG[name], f)]
            first = rng.choice(binaries)  # a release rebuilds at least one library
            rest = rng.sample([f for f in files if f != first], min(n - 1, len(files) - 1))
            for rel in (first, *rest):
                edits[name][rel] += 1
            bumps[name] += 1
            out.edits[v] = {k: dict(x) for k, x in edits.items()}
            out.bumps[v] = dict(bumps)
        return out

    def source_key(self, v: int, pkg: str) -> int:
        """The first version whose source of ``pkg`` is the one version ``v`` builds."""
        first = v
        while first > 1 and self.edits[first - 1][pkg] == self.edits[v][pkg]:
            first -= 1
        return first

    def write_source(self, root: Path, v: int, pkg: str, content: Content) -> Path:
        """The source tree of ``pkg`` at version ``v`` (written once)."""
        first = self.source_key(v, pkg)
        dest = root / f"{pkg}-src-v{first}"
        if dest.is_dir():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        remove(tmp)
        crate = [p.name for p in PACKAGES].index(pkg)
        for rel, size in self.sizes[pkg].items():
            edit = self.edits[v][pkg][rel]
            binary = is_binary(PKG[pkg], rel)
            spec = FileSpec(f"{pkg}/{rel}@{edit}", "obj" if binary else "text", size, crate)
            data = content.make(spec)
            if binary:  # where the linker puts the RPATH: after the ELF header
                data = data[:64] + PLACEHOLDER + data[64 + len(PLACEHOLDER):]
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        tmp.rename(dest)
        return dest


BUILDER = """\
import os
src, out = os.environ["src"], os.environ["out"]
deps = os.environ.get("deps", "").split()
refs = ":".join(d + "/lib" for d in deps).encode()
for dirpath, _, files in os.walk(src):
    rel = os.path.relpath(dirpath, src)
    os.makedirs(os.path.join(out, rel), exist_ok=True)
    for name in files:
        with open(os.path.join(dirpath, name), "rb") as f:
            data = f.read().replace(b"@@NIX-REFS@@", refs, 1)
        path = os.path.join(out, rel, name)
        with open(path, "wb") as f:
            f.write(data)
        if rel == "bin":
            os.chmod(path, 0o755)
os.makedirs(os.path.join(out, "nix-support"), exist_ok=True)
with open(os.path.join(out, "nix-support", "propagated-build-inputs"), "w") as f:
    f.write(" ".join(deps) + "\\n")
"""


def expression(work: Path, versions: Versions, v: int, content: Content) -> Path:
    """The Nix expression of version ``v``: every package a derivation built by Python from its
    source, with its dependencies' store paths; the app is the closure's top."""
    lines = ["let", f"  build = builtins.path {{ path = {work / 'build.py'}; "
             "name = \"build.py\"; };",
             "  mk = name: src: deps: derivation {",
             "    inherit name src deps; system = builtins.currentSystem;",
             "    builder = \"/usr/bin/python3\"; args = [ build ];", "  };"]
    for pkg in PACKAGES:
        src = versions.write_source(work / "src", v, pkg.name, content)
        deps = " ".join(pkg.deps)
        lines.append(f"  {pkg.name} = mk \"{pkg.name}-1.{versions.bumps[v][pkg.name]}\" "
                     f"(builtins.path {{ path = {src}; name = \"{pkg.name}-src\"; }}) "
                     f"[ {deps} ];")
    lines += ["in app", ""]
    path = work / f"closure-v{v}.nix"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------
# Nix clients



def nix_client(root: Path) -> Nix:
    """A Nix client with its own chroot store under ``root`` (the tests' helper), building as
    root in a sandbox that sees the host's tools."""
    tests_helpers()
    from nix_helpers import Nix

    return Nix(root, config=f"sandbox-paths = {SANDBOX_PATHS}\n")


@dataclass
class Built:
    """One version of the closure, built."""

    version: int
    top: str
    paths: dict[str, int]  # store path -> NAR size
    new: list[str]         # paths no earlier version had


def build_versions(work: Path, writer: Nix, versions: Versions) -> list[Built]:
    """Build the five versions into the writer's store."""
    (work / "build.py").write_text(BUILDER)
    content = Content(7)
    seen: set[str] = set()
    out = []
    for v in range(1, 6):
        log(f"building version {v}")
        expr = expression(work, versions, v, content)
        top = writer.run("nix-build", str(expr), "--no-out-link").stdout.split()[-1]
        info = json.loads(writer.run("nix", "path-info", "--json", "--recursive", top).stdout)
        paths = {i["path"]: int(i["narSize"]) for i in info}
        out.append(Built(v, top, paths, sorted(set(paths) - seen)))
        seen |= set(paths)
    return out


# --------------------------------------------------------------------------------------------
# The caches

NGINX_CONF = """\
__USER__
worker_processes auto;
daemon off;
pid __DIR__/nginx.pid;
error_log __DIR__/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    types { }
    default_type application/octet-stream;
    client_body_temp_path __DIR__/client_body;
    proxy_temp_path __DIR__/proxy;
    fastcgi_temp_path __DIR__/fastcgi;
    uwsgi_temp_path __DIR__/uwsgi;
    scgi_temp_path __DIR__/scgi;
    server { listen 127.0.0.1:__PORT__; root __ROOT__; }
}
"""


@contextlib.contextmanager
def nginx(work: Path, root: Path) -> Iterator[tuple[str, int]]:
    """nginx serving ``root``: its URL and master pid."""
    d = work / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.replace("__USER__", "user root;").replace("__DIR__", str(d))
                    .replace("__PORT__", str(port)).replace("__ROOT__", str(root)))
    root.mkdir(parents=True, exist_ok=True)
    (root / "alive").write_text("ok\n")
    cmd = ["nginx", "-e", str(d / "error.log"), "-p", str(d), "-c", str(conf)]
    with started([cmd], d / "nginx.log") as procs:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/alive", procs, d / "nginx.log")
        yield url, procs[0].pid


@dataclass
class Round:
    """The three caches of one round and where each is written, read and measured."""

    upload_url: dict[str, str]
    read_url: dict[str, str]
    key: dict[str, str]
    netrc: dict[str, str]
    stored_at: dict[str, Path]
    state: Path  # the server's state directory (its keys)


def drain(spool: Path) -> float:
    """Wait until the server has stored every NAR it spooled; the seconds it took."""
    start = time.perf_counter()
    while any(spool.glob("*.nar")):
        if time.perf_counter() - start > 300:
            raise RuntimeError(f"the server still holds spooled NARs in {spool} after 300 s")
        time.sleep(0.005)  # polling a directory with a deadline, not synchronising by sleep
    return time.perf_counter() - start


def stickyci_key(state: Path) -> str:
    """The public key of the stickyci cache (``stickyci nix key show``)."""
    return run([sys.executable, "-m", "stickyci", "nix", "key", "show", "--state-dir",
                str(state), CACHE]).stdout.decode().strip()


@dataclass
class Results:
    """Seconds and bytes by (cache, version), one entry per round."""

    seconds: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    other: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    stored: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    drain: dict[int, list[float]] = field(default_factory=dict)
    """By version: seconds from ``nix copy``'s return until stickyci had stored all it spooled."""

    def med(self, op: str, cache: str, v: int) -> float:
        """The median seconds of one measurement over the rounds."""
        return statistics.median(self.seconds[(op, cache, v)])

    def bytes(self, cache: str, v: int) -> float:
        """The median bytes a cache held after version ``v``."""
        return statistics.median(self.stored[(cache, v)])


class NixCacheBench:
    """Every measurement of one invocation."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.writer = nix_client(work / "writer")
        self.results = Results()
        self.built: list[Built] = []
        # operation -> (stickyci functions by inclusive share, functions by self share)
        self.profiles: dict[str, tuple[list[tuple[str, float]], list[tuple[str, float]]]] = {}

    def measure(self, op: str, cache: str, v: int, argv: list[str], env: dict[str, str]) -> None:
        """Time one Nix command."""
        start = WATCH.begin()
        run(argv, env=env)
        secs = WATCH.end() - start
        self.results.seconds.setdefault((op, cache, v), []).append(secs)
        self.results.other.setdefault((op, cache, v), []).append(WATCH.other_share)
        log(f"  v{v} {op:10} {cache:12} {secs:7.2f} s  (other CPU {WATCH.other_share:.0%})")

    def copy_argv(self, rnd: Round, cache: str, b: Built) -> list[str]:
        """``nix copy --to`` one version."""
        argv: list[str] = self.writer.argv("nix", "copy", "--to", rnd.upload_url[cache], b.top)
        return argv + (["--option", "netrc-file", rnd.netrc[cache]] if cache in rnd.netrc
                       else [])

    def realise_argv(self, rnd: Round, cache: str, b: Built, reader: Nix) -> list[str]:
        """Realise one version into ``reader``'s store from the cache alone, trusting its key."""
        argv: list[str] = reader.argv("nix-store", "--realise", b.top, "--option", "substituters",
                           rnd.read_url[cache], "--option", "trusted-public-keys",
                           rnd.key[cache])
        return argv + (["--option", "netrc-file", rnd.netrc[cache]] if cache in rnd.netrc
                       else [])

    def upload(self, rnd: Round, cache: str, b: Built) -> None:
        """Copy one version to a cache, then note the bytes the cache holds (for stickyci, once
        it has stored what it spooled: not timed, but its duration is noted)."""
        self.measure(UPLOAD, cache, b.version, self.copy_argv(rnd, cache, b), self.writer.env())
        if cache == ST:
            self.results.drain.setdefault(b.version, []).append(drain(rnd.state / SPOOL_DIR))
        self.results.stored.setdefault((cache, b.version), []).append(
            du_bytes(rnd.stored_at[cache]))
        if cache == ST and ST not in rnd.key:  # the first upload made the cache's key
            rnd.key[ST] = stickyci_key(rnd.state)

    def substitute(self, rnd: Round, cache: str, b: Built) -> None:
        """Substitute one version into an empty store; check it arrived whole."""
        reader = nix_client(self.work / "reader")
        remove(reader.root)
        self.measure(SUBST, cache, b.version, self.realise_argv(rnd, cache, b, reader),
                     reader.env())
        got = reader.run("nix-store", "--query", "--requisites", b.top).stdout.split()
        if sorted(got) != sorted(b.paths):
            raise RuntimeError(f"{cache}: version {b.version} substituted {len(got)} paths, "
                               f"not {len(b.paths)}")
        reader.run("nix-store", "--verify-path", b.top)
        remove(reader.root)

    @contextlib.contextmanager
    def caches(self, name: str, file_url: str) -> Iterator[tuple[Round, int]]:
        """Fresh caches: a ``stickyci serve`` and two file:// caches; the server's pid."""
        tests_helpers()
        from server import start_server

        root = self.work / name
        remove(root)
        dirs = {c: self.work / "files" / f"{name}-{SLUG[c]}" for c in (XZ, ZSTD)}
        for d in dirs.values():
            remove(d)
        secret, public = root / "file-key.sec", root / "file-key.pub"
        root.mkdir(parents=True)
        remove(self.writer.root / "xdg")  # its narinfo cache would remember earlier caches
        self.writer.run("nix-store", "--generate-binary-cache-key", "bench-file-1",
                        str(secret), str(public))
        try:
            with start_server(root / "server", args=("--no-access-log",)) as server:
                token = server.token("--write", f"{CACHE}*")
                netrc = root / "netrc"
                netrc.write_text(f"machine 127.0.0.1 login nix password {token}\n")
                file_key = public.read_text().strip()
                yield Round(
                    upload_url={
                        ST: f"{server.url}/nix/{CACHE}?compression="
                            f"{self.args.stickyci_compression}",
                        XZ: f"file://{dirs[XZ]}?secret-key={secret}",
                        ZSTD: f"file://{dirs[ZSTD]}?compression=zstd&secret-key={secret}"},
                    read_url={ST: f"{server.url}/nix/{CACHE}",
                              **{c: f"{file_url}/{dirs[c].name}" for c in (XZ, ZSTD)}},
                    key={XZ: file_key, ZSTD: file_key}, netrc={ST: str(netrc)},
                    stored_at={ST: Path(server.store_url.removeprefix("file://")), **dirs},
                    state=server.state), server.process.pid
        finally:
            remove(root)
            for d in dirs.values():
                remove(d)

    def one_round(self, i: int, file_url: str, nginx_pid: int) -> None:
        """Five versions through three fresh caches, interleaved."""
        with self.caches(f"round{i}", file_url) as (rnd, server_pid):
            WATCH.ours = [server_pid, nginx_pid]
            for b in self.built:
                order = CACHES[b.version % 3:] + CACHES[:b.version % 3]
                if i % 2:
                    order = order[::-1]
                for c in order:
                    self.upload(rnd, c, b)
                for c in order:
                    self.substitute(rnd, c, b)
            WATCH.ours = [nginx_pid]

    def profile(self, file_url: str) -> None:
        """Where stickyci's server spends its time: py-spy on it while the five versions are
        copied to it, then while the last one is substituted from it (not timed)."""
        with self.caches("profile", file_url) as (rnd, server_pid):
            raw = self.work / "profile-upload.txt"
            with spying(server_pid, raw):
                for b in self.built:
                    run(self.copy_argv(rnd, ST, b), env=self.writer.env())
            self.profiles[UPLOAD] = (top_inclusive(raw, 10, "stickyci/"), top_self(raw, 10))
            rnd.key[ST] = stickyci_key(rnd.state)
            reader = nix_client(self.work / "reader")
            remove(reader.root)
            raw = self.work / "profile-substitute.txt"
            with spying(server_pid, raw):
                run(self.realise_argv(rnd, ST, self.built[-1], reader), env=reader.env())
            self.profiles[SUBST] = (top_inclusive(raw, 10, "stickyci/"), top_self(raw, 10))
            remove(reader.root)

    def run(self) -> None:
        """Build the versions, then the rounds."""
        WATCH.quiet_wait = self.args.quiet_wait
        self.built = build_versions(self.work, self.writer, Versions.plan(self.args.scale))
        with nginx(self.work, self.work / "files") as (url, pid):
            for i in range(self.args.runs):
                log(f"== round {i + 1}/{self.args.runs}")
                self.one_round(i, url, pid)
            if self.args.profile:
                log("== profile")
                self.profile(url)

    # -- the report --------------------------------------------------------------------------

    def report(self, command: str, started_at: str) -> str:
        """The Markdown section."""
        m = machine()
        r = self.results
        runs = self.args.runs
        total = {c: sum(r.med(UPLOAD, c, b.version) for b in self.built) for c in CACHES}
        final = {c: r.bytes(c, 5) for c in CACHES}
        top = self.built[0]
        lines = [
            "## Nix binary cache: `stickyci serve` against a `file://` binary cache", "",
            f"Command: `{command}`, started {started_at} UTC, medians of {runs} rounds. "
            f"Machine: {m['cpu']}, {m['nproc']} CPUs, {m['ram']}, kernel {m['kernel']}, "
            f"{first_line(['nix', '--version'])}, "
            f"{first_line(['nginx', '-v']).replace('nginx version: ', '')}. "
            f"This checkout: {stickyci_revision()}.", "",
            f"The closure: {len(top.paths)} store paths, {sum(top.paths.values()) / MB:.0f} MB "
            "of NARs, generated by `bench/nix_cache.py` and built by Nix (a libc, zlib, "
            "openssl, a Python, Python packages, an app; object-like binaries that embed their "
            "dependencies' store paths, source-like text). Each version bumps one package (a "
            "few of its files change) and rebuilds every package above it against the new "
            "store path. Per round, each version is copied with `nix copy --to` to the three "
            "caches (fresh ones every round; the order rotates), then substituted from each "
            "into an empty store (`nix-store --realise`, the cache as the only substituter, "
            "its key the only trusted one). **stickyci**: `stickyci serve` over a `file://` "
            "store, `nix copy --to 'http://…/nix/bench?compression="
            f"{self.args.stickyci_compression}'`, bytes = `du -sb` of the server's store"
            f"{COMPRESSION_NOTE.get(self.args.stickyci_compression, '')}. "
            "**file:// xz** / **file:// zstd**: `nix copy --to "
            "'file://DIR?secret-key=…'` with Nix's default compression (xz) or with "
            "`&compression=zstd`, bytes = `du -sb DIR`, served to substituters by nginx.", "",
            "| version | change | paths (new) | new NAR MB | upload s: stickyci | xz | zstd "
            "| stored MB after: stickyci | xz | zstd |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in self.built:
            change = "first build" if b.version == 1 else (
                f"{BUMPS[b.version][0]} bumped ({BUMPS[b.version][1]} files)")
            new_mb = sum(b.paths[p] for p in b.new) / MB
            lines.append(
                f"| v{b.version} | {change} | {len(b.paths)} ({len(b.new)}) | {new_mb:.1f} | "
                + " | ".join(f"{r.med(UPLOAD, c, b.version):.2f}" for c in CACHES) + " | "
                + " | ".join(f"{r.bytes(c, b.version) / MB:.1f}" for c in CACHES) + " |")
        all_new = sum(sum(b.paths[p] for p in b.new) for b in self.built)
        lines.append(
            f"| **all five** | | | {all_new / MB:.1f} | "
            + " | ".join(f"**{total[c]:.2f}**" for c in CACHES) + " | "
            + " | ".join(f"**{final[c] / MB:.1f}**" for c in CACHES) + " |")
        lines += ["", "Substitution of each version into an empty store (seconds):", "",
                  "| version | stickyci | file:// xz | file:// zstd | stickyci / xz "
                  "| stickyci / zstd |", "|---|---:|---:|---:|---:|---:|"]
        for b in self.built:
            s = [r.med(SUBST, c, b.version) for c in CACHES]
            lines.append(f"| v{b.version} | " + " | ".join(f"{x:.2f}" for x in s)
                         + f" | {s[0] / s[1]:.2f}x | {s[0] / s[2]:.2f}x |")
        drained = {b.version: statistics.median(r.drain[b.version]) for b in self.built}
        stored_total = total[ST] + sum(drained.values())
        lines += ["", "stickyci answers each NAR once it is spooled (written whole, hashed, "
                  "fsynced) and stores it in the content-addressed store afterwards, while Nix "
                  "prepares its next path (`src/stickyci/server/nix/spool.py`). After each "
                  "upload the benchmark waits, untimed, until the server has stored all it "
                  "spooled, before it measures the bytes or anything else: that took "
                  + ", ".join(f"{drained[b.version]:.2f} s (v{b.version})" for b in self.built)
                  + f" after `nix copy` returned (medians). Upload and storing together: "
                  f"**{stored_total:.2f} s**, {stored_total / total[ZSTD]:.2f}x the file:// "
                  "zstd upload."]
        other = max(max(x) for x in r.other.values())
        lines += ["", f"Other processes used at most {other:.0%} of the CPUs during a "
                  "measurement (each waits up to "
                  f"{self.args.quiet_wait:g} s for a quiet machine first; none is repeated).",
                  "", target_table([
                      Target("stickyci bytes / file:// xz bytes, after five versions",
                             final[ST] / final[XZ], 0.5, "x"),
                      Target("stickyci upload / file:// xz upload, five versions",
                             total[ST] / total[XZ], 1.5, "x"),
                      Target("stickyci bytes / file:// zstd bytes, after five versions",
                             final[ST] / final[ZSTD], 0.5, "x"),
                      Target("stickyci upload / file:// zstd upload, five versions",
                             total[ST] / total[ZSTD], 1.5, "x")])]
        return "\n".join(lines + profile_lines(self.profiles)) + "\n"


def profile_lines(profiles: dict[str, tuple[list[tuple[str, float]],
                                            list[tuple[str, float]]]]) -> list[str]:
    """The report's account of where the server's time went, if it was profiled."""
    if not profiles:
        return []
    out = ["", "Where the server's time goes (`--profile`: py-spy on `stickyci serve`, "
           "every thread, 100 samples/s; shares of the samples of threads not parked on a "
           "lock or a thread pool's queue, entry points left out; `Runner.run` on top is the "
           "event loop's own C code, I/O and waiting):", ""]
    for op, (inclusive, own) in profiles.items():
        what = ("copying the five versions to it" if op == UPLOAD
                else "substituting the last version from it")
        out += [f"- **{what}**: in stickyci's functions (inclusive): "
                + ", ".join(f"`{name}` {share:.0%}" for name, share in inclusive) + ".",
                "  At the top of the stack: "
                + ", ".join(f"`{name}` {share:.0%}" for name, share in own) + "."]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = cli.parser(__doc__)
    p.add_argument("--scale", type=float, default=1.0,
                   help="sizes of the closure (1.0: ~100 MB of NARs)")
    p.add_argument("--runs", type=int, default=3, help="rounds (medians reported)")
    p.add_argument("--work-dir", type=Path, default=Path("/var/tmp/stickyci-bench"),
                   help="scratch space (a nix-cache directory under it is removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--profile", action="store_true",
                   help="then profile the server (py-spy) through the five uploads and a "
                   "substitution, and report where its time goes")
    p.add_argument("--stickyci-compression", choices=("none", "zstd", "xz"), default="zstd",
                   help="what Nix compresses its uploads to stickyci with (default zstd); the "
                   "server decompresses them and compresses only the chunks it lacks")
    p.add_argument("--write", type=Path, metavar="MD", help="write/replace this section")
    p.add_argument("--quiet-wait", type=float, default=10, metavar="S",
                   help="before each measurement, wait up to S seconds for other processes "
                   "to stop using the CPUs (default 10)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.scale <= 0:
        p.error("--runs must be >= 1 and --scale > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    if not cli.preflight("nix", "nginx", why_root="Nix builds as root, without build users"):
        return 2
    command = cli.command_line("bench/nix_cache.py", argv)
    started_at = cli.started_at()
    work = args.work_dir.resolve() / "nix-cache"
    remove(work)
    work.mkdir(parents=True)
    bench = NixCacheBench(args, work)
    try:
        bench.run()
    finally:
        if not args.keep:
            remove(work)
    section = bench.report(command, started_at)
    print(section)
    if args.write:
        write_section(args.write, KEY, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
