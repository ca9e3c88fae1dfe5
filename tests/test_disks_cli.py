"""End-to-end through the CLI: mount, write, commit, remount, for each strategy that runs here."""

from __future__ import annotations

import os

import pytest
from helpers import STRATEGIES, Env, elsewhere


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_commit_then_remount_sees_changes(env: Env, strategy: str) -> None:
    ws = env.root / "ws"
    first = env.json("disk", "mount", "deps", str(ws), "--strategy", strategy)
    assert first["fresh"] and first["strategy"] == strategy
    (ws / "lib").mkdir()
    (ws / "lib" / "a.o").write_bytes(b"object" * 1000)
    (ws / "gone").write_text("bye")
    c1 = env.json("disk", "commit", str(ws))
    assert c1["committed"] and c1["generation"] == 1 and c1["files"] == 2

    env.run("disk", "mount", "deps", str(ws), "--strategy", strategy)
    assert (ws / "lib" / "a.o").read_bytes() == b"object" * 1000
    (ws / "gone").unlink()
    (ws / "lib" / "b.o").write_text("new")
    c2 = env.json("disk", "commit", str(ws))
    assert (c2["generation"], c2["added"], c2["removed"]) == (2, 1, 1)
    assert list(ws.iterdir()) == []

    d = env.json("disk", "diff", "deps")
    assert d["added"] == ["lib/b.o"] and d["removed"] == ["gone"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_on_change_skips_an_unchanged_disk(env: Env, strategy: str) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)
    (ws / "f").write_text("x")
    env.run("disk", "commit", str(ws))
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)
    assert env.json("disk", "commit", str(ws))["committed"] is False
    assert len(env.json("disk", "show", "k")["generations"]) == 1
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)
    assert env.json("disk", "commit", str(ws), "--mode", "always")["generation"] == 2


@pytest.mark.root
def test_overlay_commit_reads_whiteouts_and_opaque_dirs(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    for d in ("keep", "replace", "drop"):
        (ws / d).mkdir()
        (ws / d / "old").write_text(d)
    env.run("disk", "commit", str(ws))
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    os.system(f"rm -rf {ws / 'drop'} {ws / 'replace'}")
    (ws / "replace").mkdir()  # a new dir over a deleted one is opaque in the upper layer
    (ws / "replace" / "new").write_text("n")
    r = env.json("disk", "commit", str(ws))
    assert r["committed"]
    d = env.json("disk", "diff", "k")
    assert sorted(d["removed"]) == ["drop", "drop/old", "replace/old"]
    assert d["added"] == ["replace/new"]


def test_history_keeps_three_generations(env: Env) -> None:
    ws = env.root / "ws"
    for i in range(5):
        env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
        (ws / "n").write_text(str(i))
        env.run("disk", "commit", str(ws))
    gens = [g["gen"] for g in env.json("disk", "show", "k")["generations"]]
    assert gens == [3, 4, 5]


def test_if_missing_commits_only_once(env: Env) -> None:
    ws = env.root / "ws"
    for i in range(2):
        env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
        (ws / "n").write_text(str(i))
        r = env.json("disk", "commit", str(ws), "--mode", "if-missing")
        assert r["committed"] is (i == 0)
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    assert (ws / "n").read_text() == "0"


def test_unmount_discards(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws))
    (ws / "f").write_text("lost")
    env.run("disk", "unmount", str(ws))
    assert list(ws.iterdir()) == []
    assert env.json("disk", "ls") == []


def test_race_is_reported_and_fail_mode_refuses(env: Env) -> None:
    a, b, c = env.root / "a", env.root / "b", env.root / "c"
    for p in (a, b, c):
        env.run("disk", "mount", "k", str(p), "--strategy", "copy")
        (p / "who").write_text(p.name)
    assert env.json("disk", "commit", str(a))["raced_with"] == []
    raced = env.json("disk", "commit", str(b))
    assert [g["gen"] for g in raced["raced_with"]] == [1] and raced["generation"] == 2
    refused = env.run("disk", "commit", str(c), "--on-conflict", "fail", check=False)
    assert refused.returncode == 5 and "committed since this mount" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert env.json("disk", "show", "k")["generations"][-1]["gen"] == 2
    assert (c / "who").read_text() == "c"  # the refused mount is still there to retry


def test_rm_and_evict(env: Env) -> None:
    ws = env.root / "ws"
    for key in ("old", "new"):
        env.run("disk", "mount", key, str(ws), "--strategy", "copy")
        (ws / "f").write_text(key)
        env.run("disk", "commit", str(ws))
    assert env.json("disk", "evict", "--unused-for", "1h")["evicted"] == []
    dry = env.json("disk", "evict", "--unused-for", "0s", "--dry-run")
    assert dry["evicted"] == ["old", "new"]
    assert len(env.json("disk", "ls")) == 2
    env.run("disk", "rm", "old")
    assert [d["key"] for d in env.json("disk", "ls")] == ["new"]
    missing = env.run("disk", "rm", "old", check=False)
    assert missing.returncode == 3 and "does not exist" in missing.stderr


def test_gc_removes_what_no_disk_references(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    (ws / "big").write_bytes(os.urandom(1 << 20))
    env.run("disk", "commit", str(ws))
    env.run("disk", "mount", "other", str(ws), "--strategy", "copy")
    (ws / "keep").write_bytes(os.urandom(1000))
    env.run("disk", "commit", str(ws))
    assert env.json("disk", "gc", "--grace", "0s")["packs_deleted"] == 0
    env.run("disk", "rm", "k")
    assert env.json("disk", "gc", "--grace", "1h")["packs_deleted"] == 0  # too young
    dry = env.json("disk", "gc", "--grace", "0s", "--dry-run")
    assert dry["packs_deleted"] == 1 and dry["bytes_freed"] > 1 << 20
    assert env.json("disk", "gc", "--grace", "0s")["packs_deleted"] == 1
    env.run("disk", "mount", "other", str(ws), "--strategy", "copy")
    assert (ws / "keep").stat().st_size == 1000


def test_gc_points_the_pack_hints_at_where_it_moved_the_objects(env: Env) -> None:
    ws = env.root / "ws"
    files = {f"f{i:02}.bin": os.urandom(80 << 10) for i in range(24)}  # one pack, no bundle
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    for name, data in files.items():
        (ws / name).write_bytes(data)
    env.run("disk", "commit", str(ws))
    kept = dict(list(files.items())[:2])
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    for name in files.keys() - kept.keys():
        (ws / name).unlink()
    env.run("disk", "commit", str(ws))
    for _ in range(2):  # the keep policy (3 generations) pushes generation 1 out
        env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
        env.run("disk", "commit", str(ws), "--mode", "always")
    def packs() -> set[str]:
        return {p.name for p in (env.store / "packs").iterdir()}

    before = packs()
    (hinted,) = [g["packs"] for g in env.json("disk", "show", "k")["generations"] if "packs" in g]
    said = env.run("disk", "gc", "--grace", "0s").stdout
    assert "1 repacked" in said and "1 disks' pack hints updated" in said, said

    removed, made = before - packs(), packs() - before
    assert removed and removed <= set(hinted)  # the hint named the pack gc repacked...
    (now,) = [g["packs"] for g in env.json("disk", "show", "k")["generations"] if "packs" in g]
    assert set(now) == (set(hinted) - removed) | made  # ...and now names where it went
    there, ws2 = elsewhere(env, "cache2"), env.root / "ws2"
    there.run("disk", "mount", "k", str(ws2), "--strategy", "copy")
    assert {p.name: p.read_bytes() for p in ws2.iterdir()} == kept


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["disk", "mount", "bad/key", "{ws}"], 2, "invalid disk key"),
    (["disk", "mount", "k", "{file}"], 2, "is not a directory"),
    (["disk", "commit", "{missing}"], 2, "does not exist"),
    (["disk", "commit", "{file}"], 2, "is not a directory"),
    (["disk", "commit", "{plain}"], 2, "is not a stickyci mount"),
    (["disk", "show", "nope"], 3, "does not exist"),
    (["disk", "evict", "--unused-for", "soon"], 2, "invalid duration"),
])
def test_bad_input_gets_one_line(env: Env, args: list[str], code: int, needle: str) -> None:
    (env.root / "file").write_text("x")
    (env.root / "plain").mkdir()
    paths = {"ws": env.root / "ws", "file": env.root / "file", "missing": env.root / "missing",
             "plain": env.root / "plain"}
    proc = env.run(*[a.format(**paths) for a in args], check=False)
    assert proc.returncode == code
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_mount_onto_non_empty_dir_is_refused(env: Env) -> None:
    ws = env.root / "ws"
    ws.mkdir()
    (ws / "precious").write_text("mine")
    proc = env.run("disk", "mount", "k", str(ws), check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (ws / "precious").read_text() == "mine"


def test_base_cache_makes_second_mount_warm(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    (ws / "f").write_text("x")
    env.run("disk", "commit", str(ws))
    assert env.json("disk", "mount", "k", str(ws), "--strategy", "copy")["base_cached"]
    env.run("disk", "unmount", str(ws))
    for base in (env.cache / "bases").glob("*.json"):
        base.unlink()
    for base in (env.cache / "bases").iterdir():
        if base.is_dir():
            os.system(f"rm -rf {base}")
    assert not env.json("disk", "mount", "k", str(ws), "--strategy", "copy")["base_cached"]
    assert (ws / "f").read_text() == "x"
