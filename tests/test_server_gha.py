"""The GitHub Actions cache service of ``stickyci serve``, driven by the real client.

``@actions/cache`` from npm (``tests/gha_client``, installed by ``npm ci``) runs under Node
against a real ``stickyci serve`` on loopback, as a runner would with ``ACTIONS_RESULTS_URL``
pointing at it: it tars and zstd-compresses directories, creates entries, uploads through the
Azure SDK (one ``PUT`` up to 128 MiB, blocks above), finalizes, looks keys up and downloads.
The protocol tests share one server and keep apart by unique keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families
from server import Server, start_server, store_dir, unique

CLIENT = Path(__file__).parent / "gha_client"
MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (CLIENT / "node_modules" / "@actions" / "cache").is_dir(),
    reason="needs node and `npm ci --prefix tests/gha_client` (.ci/run does both)")


def run_client(server: Server, token: str, cwd: Path, *args: str) -> tuple[object, str]:
    """``driver.js ARGS`` in ``cwd`` as a runner of ``server``: its result and its log."""
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd.parent),
           "ACTIONS_RESULTS_URL": server.url + "/", "ACTIONS_RUNTIME_TOKEN": token,
           "ACTIONS_CACHE_SERVICE_V2": "true", "RUNNER_TEMP": str(cwd.parent / "runner-temp"),
           "RUNNER_DEBUG": "1"}  # the client's debug log: its requests, and why it failed
    proc = subprocess.run(["node", str(CLIENT / "driver.js"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout + proc.stderr
    return json.loads(last.removeprefix("RESULT ")), proc.stdout


def save(server: Server, token: str, ws: Path, key: str, *paths: str) -> tuple[object, str]:
    """Save ``paths`` (relative to ``ws``) under ``key``: the entry id, or -1."""
    return run_client(server, token, ws, "save", key, *(paths or ("data",)))


def restore(server: Server, token: str, ws: Path, key: str, *restore_keys: str,
            paths: tuple[str, ...] = ("data",)) -> tuple[object, str]:
    """Restore into ``ws``: the key matched, or None on a miss."""
    extra = ["--restore-keys", ",".join(restore_keys)] if restore_keys else []
    return run_client(server, token, ws, "restore", key, *extra, *paths)


def make_tree(root: Path, size: int, seed: int = 0) -> None:
    """``size`` bytes in files of up to 8 MiB: half random, half repeats of a random block
    (so zstd shrinks the archive to about half, and the data is quick to make)."""
    rng = random.Random(seed)
    block = rng.randbytes(64 << 10)
    root.mkdir(parents=True, exist_ok=True)
    left, i = size, 0
    while left > 0:
        n = min(left, rng.randint(1, 8 * MiB) if size > MiB else left)
        body = os.urandom(n // 2) + (block * (n // len(block) + 1))[: n - n // 2]
        (root / f"f{i:04d}.bin").write_bytes(body)
        left -= n
        i += 1


def tree_hash(root: Path) -> dict[str, str]:
    """Each file's SHA-256 by its path under ``root``."""
    return {str(p.relative_to(root)): hashlib.file_digest(open(p, "rb"), "sha256").hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when the labelled series does not exist yet)."""
    with server.client() as c:
        text = c.get("/metrics").raise_for_status().text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def upload_puts(server: Server, entry_id: object) -> list[dict[str, object]]:
    """The access-log lines of the upload requests of one entry."""
    lines = [json.loads(line) for line in server.log.read_text().splitlines()
             if line.startswith("{")]
    return [line for line in lines if line["path"] == f"/gha/upload/{entry_id}"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("gha")) as srv:
        yield srv


@pytest.fixture(scope="module")
def token_for(server: Server) -> Callable[..., str]:
    """A token per distinct scope, created once."""
    return server.scoped


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A runner's workspace."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "runner-temp").mkdir()
    return tmp_path / "ws"


# -- save and restore, small to big -------------------------------------------------------


def test_save_restore_small(server: Server, token_for: Callable[..., str], ws: Path) -> None:
    tok = token_for("--write", "*")
    (ws / "data" / "sub").mkdir(parents=True)
    (ws / "data" / "sub" / "a.txt").write_bytes(os.urandom(1000))
    (ws / "data" / "b.txt").write_text("x" * 24)
    want = tree_hash(ws / "data")
    key = unique("small")
    entry, _ = save(server, tok, ws, key)
    assert isinstance(entry, int) and entry > 0
    shutil.rmtree(ws / "data")
    got, log = restore(server, tok, ws, key)
    assert got == key, log
    assert tree_hash(ws / "data") == want
    # An entry is immutable: a second save under the same key and version stores nothing.
    again, log = save(server, tok, ws, key)
    assert again == -1 and "already exists" in log


def test_save_restore_100mb_in_one_put(server: Server, token_for: Callable[..., str],
                                       ws: Path) -> None:
    tok = token_for("--write", "*")
    make_tree(ws / "data", 100 * MiB, seed=1)
    want = tree_hash(ws / "data")
    key = unique("mid")
    entry, log = save(server, tok, ws, key)
    assert isinstance(entry, int) and entry > 0, log
    puts = upload_puts(server, entry)
    assert len(puts) == 1 and puts[0]["status"] == 201  # under 128 MiB: one PUT, no blocks
    shutil.rmtree(ws / "data")
    got, log = restore(server, tok, ws, key)
    assert got == key, log
    assert tree_hash(ws / "data") == want


def test_save_restore_300mb_in_blocks_and_dedup(server: Server, token_for: Callable[..., str],
                                                ws: Path) -> None:
    tok = token_for("--write", "*")
    make_tree(ws / "data", 300 * MiB, seed=2)
    want = tree_hash(ws / "data")
    key = unique("big")
    new_before = metric(server, "stickyci_gha_archive_bytes_total", kind="new")
    entry, log = save(server, tok, ws, key)
    assert isinstance(entry, int) and entry > 0, log
    puts = upload_puts(server, entry)
    # 64 MiB blocks, then the block list; the archive is over the 128 MiB of a single PUT.
    assert len(puts) >= 4 and all(p["status"] == 201 for p in puts)
    first_new = metric(server, "stickyci_gha_archive_bytes_total", kind="new") - new_before

    # The next version of the cache: one file changed, one added. The client's archive is
    # all new bytes after the first change; the server stores only the tar's new chunks.
    victim = sorted((ws / "data").iterdir())[3]
    victim.write_bytes(os.urandom(victim.stat().st_size))
    (ws / "data" / "added.bin").write_bytes(os.urandom(MiB))
    want2 = tree_hash(ws / "data")
    key2 = unique("big")
    before = metric(server, "stickyci_gha_archive_bytes_total", kind="new")
    entry2, log = save(server, tok, ws, key2)
    assert isinstance(entry2, int) and entry2 > 0, log
    second_new = metric(server, "stickyci_gha_archive_bytes_total", kind="new") - before
    assert second_new < first_new / 5, (first_new, second_new)
    assert second_new >= victim.stat().st_size  # the changed file itself is new

    shutil.rmtree(ws / "data")
    got, log = restore(server, tok, ws, key)
    assert got == key, log
    assert tree_hash(ws / "data") == want
    shutil.rmtree(ws / "data")
    got, log = restore(server, tok, ws, key2)
    assert got == key2, log
    assert tree_hash(ws / "data") == want2


# -- matching -----------------------------------------------------------------------------


def test_restore_keys_match_as_github(server: Server, token_for: Callable[..., str],
                                      ws: Path) -> None:
    tok = token_for("--write", "*")
    base = unique("deps")
    for name in ("old", "exact", "newer"):
        (ws / "data").mkdir(exist_ok=True)
        (ws / "data" / "which").write_text(name)
        entry, log = save(server, tok, ws, f"{base}-{name}")
        assert isinstance(entry, int) and entry > 0, log
    shutil.rmtree(ws / "data")
    # A prefix: the newest entry it starts.
    got, _ = restore(server, tok, ws, f"{base}-missing", f"{base}-")
    assert got == f"{base}-newer" and (ws / "data" / "which").read_text() == "newer"
    # An exact restore key beats a newer prefix match; restore keys are tried in order.
    got, _ = restore(server, tok, ws, f"{base}-missing", f"{base}-nothing", f"{base}-exact")
    assert got == f"{base}-exact" and (ws / "data" / "which").read_text() == "exact"
    # The primary key is matched as a prefix too, before any restore key.
    got, _ = restore(server, tok, ws, f"{base}-ol", f"{base}-exact")
    assert got == f"{base}-old"
    # Another version (other paths: another archive layout) never matches.
    got, _ = restore(server, tok, ws, f"{base}-exact", f"{base}-", paths=("other",))
    assert got is None


def test_miss(server: Server, token_for: Callable[..., str], ws: Path) -> None:
    tok = token_for("--write", "*")
    misses = metric(server, "stickyci_cache_lookups_total", kind="gha", result="miss")
    got, log = restore(server, tok, ws, unique("nothing"), unique("nothing"))
    assert got is None and "Failed to restore" not in log
    assert not (ws / "data").exists()
    assert metric(server, "stickyci_cache_lookups_total", kind="gha",
                  result="miss") == misses + 1


# -- tokens and scopes --------------------------------------------------------------------


def test_wrong_token_saves_and_restores_nothing(server: Server, token_for: Callable[..., str],
                                                ws: Path) -> None:
    key = unique("tok")
    (ws / "data").mkdir()
    (ws / "data" / "f").write_text("secret")
    entry, _ = save(server, token_for("--write", "*"), ws, key)
    assert isinstance(entry, int) and entry > 0
    shutil.rmtree(ws / "data")
    bogus = "sci_00000000_" + "x" * 43
    got, log = restore(server, bogus, ws, key)
    assert got is None and "not valid on this server" in log
    assert not (ws / "data").exists()
    (ws / "data").mkdir()
    (ws / "data" / "f").write_text("poison")
    entry, log = save(server, bogus, ws, unique("tok"))
    assert entry == -1 and "not valid on this server" in log


def test_fork_token_cannot_poison_or_read_main(server: Server, token_for: Callable[..., str],
                                               ws: Path) -> None:
    main = token_for("--write", "main-*")
    fork = token_for("--read", "main-*", "--write", "pr-7-*")
    other = token_for("--write", "pr-8-*")
    key = unique("main-deps")
    (ws / "data").mkdir()
    (ws / "data" / "f").write_text("trusted")
    assert isinstance(save(server, main, ws, key)[0], int)
    # The fork may not write main's keys: the client warns and carries on.
    (ws / "data" / "f").write_text("poison")
    entry, log = save(server, fork, ws, unique("main-deps"))
    assert entry == -1 and "cache write denied" in log
    # ...but may write its own, and read main's (its --read allows it).
    pr_key = unique("pr-7-deps")
    assert isinstance(save(server, fork, ws, pr_key)[0], int)
    shutil.rmtree(ws / "data")
    got, _ = restore(server, fork, ws, key)
    assert got == key and (ws / "data" / "f").read_text() == "trusted"
    # Main never picks up the fork's entry, even by a prefix that would match it.
    shutil.rmtree(ws / "data")
    got, _ = restore(server, main, ws, "pr-7-", "pr-")
    assert got is None
    # A token without read on main's keys sees neither main's nor the other fork's entries.
    got, _ = restore(server, other, ws, key, "main-", "pr-7-")
    assert got is None and not (ws / "data").exists()


# -- eviction, gc, metrics ----------------------------------------------------------------


def test_gc_keeps_entries_and_eviction_removes_them(tmp_path: Path, ws: Path) -> None:
    root = tmp_path / "srv"
    # A grace above zero: the scheduled gc must not sweep an upload's packs before its
    # entry's record names them (a commit has the same window, and the same guard).
    with start_server(root, args=["--evict-after", "10s", "--evict-every", "1s",
                                  "--gc-grace", "2s"]) as srv:
        tok = srv.token("--write", "*")
        make_tree(ws / "data", 3 * MiB, seed=3)
        want = tree_hash(ws / "data")
        key = unique("evict")
        assert isinstance(save(srv, tok, ws, key)[0], int)
        # A gc from the command line, with no grace, keeps what the entry reaches.
        subprocess.run([sys.executable, "-m", "stickyci", "disk", "gc", "--grace", "0s",
                        "--store", srv.store_url], check=True, capture_output=True)
        shutil.rmtree(ws / "data")
        got, log = restore(srv, tok, ws, key)
        assert got == key, log
        assert tree_hash(ws / "data") == want
        # Unused past --evict-after: evicted, counted, and its packs collected by the gc.
        wait_for(lambda: metric(srv, "stickyci_evictions_total", kind="gha") >= 1,
                 "the entry to be evicted", timeout=30)
        packs = store_dir(srv) / "packs"
        wait_for(lambda: not any(packs.iterdir()), "gc to collect the entry's packs",
                 timeout=30)
        kept = ws.parent / "kept"
        (ws / "data").rename(kept)
        got, _ = restore(srv, tok, ws, key)
        assert got is None and not (ws / "data").exists()
        # The same content again, its packs gone: stored anew, not deduplicated against the
        # server's stale view of what the store holds.
        kept.rename(ws / "data")
        entry, log = save(srv, tok, ws, key)
        assert isinstance(entry, int) and entry > 0, log
        shutil.rmtree(ws / "data")
        got, log = restore(srv, tok, ws, key)
        assert got == key, log
        assert tree_hash(ws / "data") == want


def test_metrics_label_the_service(server: Server, token_for: Callable[..., str],
                                   ws: Path) -> None:
    tok = token_for("--write", "*")
    (ws / "data").mkdir()
    (ws / "data" / "f").write_bytes(os.urandom(5000))
    before = metric(server, "stickyci_requests_total", route="gha", method="PUT", status="201")
    assert isinstance(save(server, tok, ws, unique("m"))[0], int)
    assert metric(server, "stickyci_requests_total", route="gha", method="PUT",
                  status="201") == before + 1
    assert metric(server, "stickyci_requests_total", route="twirp", method="POST",
                  status="200") >= 2
    with server.client() as c:
        text = c.get("/metrics").text
    # The signed URLs' ids and signatures never become labels.
    assert not re.search(r'route="[^"]*\d{6}', text)

