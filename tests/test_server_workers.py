"""``stickyci serve --workers 2``: two processes on one port, sharing what they must.

Every test drives a real ``stickyci serve --workers 2`` over HTTP. Which worker answers a
connection is the kernel's choice, so the tests open a fresh connection per request and, where
it matters, first make sure both workers have answered: what they check (the metrics' sum, the
LRU order, tokens, refs, GitHub Actions uploads) would differ between the workers if it were
not shared.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from helpers import Env, commit_tree, read_tree, wait_for
from nix_helpers import Nix, needs_nix, public_key, random_files, settled
from prometheus_client.parser import text_string_to_metric_families
from server import Server, free_port, remote, start_server, store_dir, unique

WORKERS = ("--workers", "2")
KiB = 1024


def worker_pids(server: Server) -> set[int]:
    """The pids of the server's worker processes (its children running a spawned worker)."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = set()
    for child in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
        except FileNotFoundError:
            continue
    return found


def metrics_dir(server: Server) -> Path:
    """Where the workers keep their metrics (their environment says)."""
    pid = next(iter(worker_pids(server)))
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(item.partition(b"=")[2].decode())
    raise AssertionError("the workers run without PROMETHEUS_MULTIPROC_DIR")


def counted_by(server: Server) -> set[int]:
    """The pids of the processes that have counted something in the shared metrics."""
    return {int(f.stem.rpartition("_")[2]) for f in metrics_dir(server).glob("*.db")}


def get(server: Server, path: str, token: str | None = None) -> httpx2.Response:
    """One GET on a connection of its own."""
    tok = server.admin if token is None else token
    return httpx2.get(server.url + path, headers={"authorization": f"Bearer {tok}"}, timeout=30)


def put(server: Server, path: str, body: bytes) -> httpx2.Response:
    """One PUT on a connection of its own."""
    return httpx2.put(server.url + path, content=body, timeout=30,
                     headers={"authorization": f"Bearer {server.admin}"})


def both_answered(server: Server) -> None:
    """Send requests until both workers have answered (and counted) at least one."""
    workers = worker_pids(server)
    assert len(workers) == 2

    def answered() -> bool:
        # Several connections at once: the kernel may hand every lone connection to the same
        # worker, but not one that arrives while that worker is busy with another.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: get(server, "/healthz").status_code, range(8)))
        assert statuses == [200] * 8
        return workers <= counted_by(server)

    wait_for(answered, "both workers to answer a request", timeout=60)


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` through a connection of its own."""
    text = get(server, "/metrics").raise_for_status().text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def cas(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("workers"), args=WORKERS) as srv:
        both_answered(srv)
        yield srv


def _lookups_shown(page: str, instance: str) -> int | None:
    """The lookups the caches page shows for a Bazel instance, None if it has no row."""
    row = re.search(rf'data-name="{instance}">.*?class="num lookups">(\d+)<', page, re.S)
    return int(row.group(1)) if row else None


def test_the_caches_page_of_any_worker_counts_every_workers_lookups(server: Server) -> None:
    # Lookups of one instance over 8 connections at a time reach both workers; the minute
    # under way, as either worker's page shows it, holds them all within a sample (10 s).
    instance = unique("tally")
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(
            lambda _: get(server, f"/{instance}/cas/{os.urandom(32).hex()}").status_code,
            range(64)))
    assert statuses == [404] * 64

    def shown() -> bool:
        with ThreadPoolExecutor(4) as pool:
            pages = list(pool.map(lambda _: get(server, "/ui/caches").text, range(4)))
        return all(_lookups_shown(p, instance) == 64 for p in pages)

    wait_for(shown, "both workers' pages to show every lookup", timeout=15)


def test_metrics_are_the_sum_over_the_workers(server: Server) -> None:
    before = metric(server, "stickyci_requests_total", route="cas", method="GET", status="404")
    _, digest = cas(10)
    for _ in range(20):
        assert get(server, f"/cas/{digest}").status_code == 404
    # Every scrape, through whichever worker, counts all 20 (one worker saw only its share).
    for _ in range(6):
        got = metric(server, "stickyci_requests_total", route="cas", method="GET",
                     status="404")
        assert got == before + 20
    assert metric(server, "stickyci_cache_lookups_total", kind="cas", result="miss") >= 20


def test_a_token_created_or_revoked_is_seen_by_every_worker_at_once(server: Server) -> None:
    token = server.token("--read", "*")
    data, digest = cas(100)
    assert put(server, f"/cas/{digest}", data).status_code == 200
    # Right after `token create`, on fresh connections spread over both workers.
    assert all(get(server, f"/cas/{digest}", token).status_code == 200 for _ in range(12))
    token_id = token.split("_")[1]
    subprocess.run([sys.executable, "-m", "stickyci", "token", "revoke", "--state-dir",
                    str(server.state), token_id], check=True, capture_output=True)
    answers = {get(server, f"/cas/{digest}", token).status_code for _ in range(12)}
    assert answers == {401}


def test_a_ref_written_through_one_worker_is_readable_through_the_other(
        server: Server, env: Env) -> None:
    # A scoped token's reads are filtered by the refs it may read: a worker that had not
    # heard of the new generation would hide its objects and the mount would fail.
    key = unique("team")
    writer = remote(env, server, server.token("--write", "team-*"), cache="writer")
    for gen in range(1, 4):
        files = {"f.txt": os.urandom(3000), "gen": str(gen).encode()}
        done = commit_tree(writer, key, files, ws=f"ws{gen}")
        assert done["generation"] == gen
        reader = remote(env, server, server.token("--read", "team-*"), cache=f"reader{gen}")
        ws = env.root / f"read{gen}"
        reader.run("disk", "mount", key, str(ws), "--strategy", "copy")
        assert read_tree(ws) == files
        reader.run("disk", "unmount", str(ws))


def test_max_size_evicts_by_the_whole_servers_use_order(tmp_path: Path) -> None:
    # 100 KiB entries under a 1,000,000-byte limit: evicting down to 90% keeps 8 of 11.
    with start_server(tmp_path, args=(*WORKERS, "--max-size", "1000000")) as srv:
        both_answered(srv)
        entries = [cas(100 * KiB) for _ in range(9)]
        for data, digest in entries:
            assert put(srv, f"/cas/{digest}", data).status_code == 200
        # A hit on the oldest, through whichever worker, makes it the youngest.
        for _ in range(4):
            assert get(srv, f"/cas/{entries[0][1]}").status_code == 200
        for data, digest in [cas(100 * KiB) for _ in range(2)]:
            assert put(srv, f"/cas/{digest}", data).status_code == 200
            entries.append((data, digest))
        store = store_dir(srv) / "cas"
        evicted = [entries[1][1], entries[2][1]]

        def gone() -> bool:
            return not any((store / f"default.{d}").exists() for d in evicted)

        wait_for(gone, "the two least recently used entries to be evicted")
        kept = [d for i, (_, d) in enumerate(entries) if i not in (1, 2)]
        assert all((store / f"default.{d}").exists() for d in kept)
        assert metric(srv, "stickyci_evictions_total", kind="cas") == 2
        # Each entry was evicted once: nothing more goes while nothing more comes.
        assert sorted(os.listdir(store)) == sorted(f"default.{d}" for d in kept)


def test_workers_on_a_port_another_server_shares_by_reuseport_are_refused(
        server: Server, tmp_path: Path) -> None:
    # The workers' sockets share the port with SO_REUSEPORT, which a second stickyci would
    # do too: it must not quietly take part of the first one's clients.
    proc = subprocess.run([sys.executable, "-m", "stickyci", "serve", "--listen",
                           f"127.0.0.1:{server.port}", "--state-dir", str(tmp_path / "state"),
                           "--store", f"file://{tmp_path / 'store'}", *WORKERS],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 6, proc.stderr
    assert f"127.0.0.1:{server.port} is already in use by pid " in proc.stderr


def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    with start_server(tmp_path, args=WORKERS) as srv:
        first = worker_pids(srv)
        assert len(first) == 2
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(srv)) == 2 and victim not in worker_pids(srv),
                 "a new worker in place of the killed one", timeout=60)
        assert all(get(srv, "/healthz").status_code == 200 for _ in range(10))
        assert "worker" in srv.log.read_text() and "starting it again" in srv.log.read_text()


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    with start_server(tmp_path, args=WORKERS) as srv:
        workers = worker_pids(srv)
        shared = metrics_dir(srv)
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
        assert not shared.exists()  # the metrics' files go with the server


def test_workers_that_keep_dying_stop_the_server_with_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "history.db").mkdir(parents=True)  # every worker fails as it starts
    subprocess.run([sys.executable, "-m", "stickyci", "token", "create", "--state-dir",
                    str(state), "--admin"], check=True, capture_output=True)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stickyci", "serve", "--store", f"file://{tmp_path / 'store'}",
         "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(state), *WORKERS],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("stickyci: error: worker ") and "the server stops" in last, \
        proc.stderr
    assert time.monotonic() - started < 90


@pytest.mark.parametrize("workers", ["0", "65", "x"])
def test_a_bad_worker_count_is_one_line(tmp_path: Path, workers: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stickyci", "serve", "--store", f"file://{tmp_path}",
         "--state-dir", str(tmp_path / "state"), "--workers", workers],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--workers" in proc.stderr


GHA_CLIENT = Path(__file__).parent / "gha_client"


@pytest.mark.skipif(shutil.which("node") is None
                    or not (GHA_CLIENT / "node_modules" / "@actions" / "cache").is_dir(),
                    reason="needs node and `npm ci --prefix tests/gha_client`")
def test_github_actions_cache_saves_and_restores_across_workers(server: Server,
                                                                tmp_path: Path) -> None:
    from test_server_gha import restore, save, tree_hash

    token = server.token("--write", "*")
    for i in range(4):  # each save and restore: several requests, spread over the workers
        ws = tmp_path / f"run{i}" / "ws"
        (ws / "data").mkdir(parents=True)
        (tmp_path / f"run{i}" / "runner-temp").mkdir()
        (ws / "data" / "a.bin").write_bytes(os.urandom(50_000 + i))
        want = tree_hash(ws / "data")
        key = unique("gha-workers")
        entry, log = save(server, token, ws, key)
        assert isinstance(entry, int) and entry > 0, log
        shutil.rmtree(ws / "data")
        got, log = restore(server, token, ws, key)
        assert got == key, log
        assert tree_hash(ws / "data") == want


@needs_nix
def test_nix_copy_through_the_workers_is_spooled_stored_and_substituted(
        server: Server, tmp_path: Path) -> None:
    # Each NAR and its narinfo may reach different workers; every worker has an ingester, and
    # each spooled NAR is stored by one of them.
    writer = Nix(tmp_path / "writer")
    paths = [writer.add_tree(f"wk-{i}", random_files(10 + i, 3, 200 * KiB)) for i in range(3)]
    copied = writer.copy_to(f"{server.url}/nix/wk?compression=none", *paths,
                            netrc=writer.netrc("127.0.0.1", server.admin))
    assert copied.returncode == 0, copied.stderr
    settled(server.state)
    # The backlog any worker reports is the shared spool's: drained.
    assert "\nstickyci_nix_spool_nars 0.0\n" in httpx2.get(f"{server.url}/metrics").text
    pins = [p for p in (store_dir(server) / "roots").iterdir() if p.name.startswith("nix.wk.")]
    assert len(pins) == len(paths)
    reader = Nix(tmp_path / "reader")
    netrc = reader.netrc("127.0.0.1", server.admin)
    for path in paths:
        got = reader.substitute(f"{server.url}/nix/wk", public_key(server.state, "wk"), path,
                                netrc=netrc)
        assert got.returncode == 0, got.stderr
        assert reader.dump(path) == writer.dump(path)
