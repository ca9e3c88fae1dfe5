"""Faults and garbage collection of sticky disks on a real S3 server (SeaweedFS), through the CLI.

The server killed in the middle of a commit, objects damaged in the bucket, and gc repacking
packs that became mostly garbage: the same guarantees as on ``file://`` (``test_faults.py``),
checked against what the bucket really holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import (
    Env,
    elsewhere,
    is_mount_record,
    one_line_error,
    reap,
    start_commit,
    tree_digest,
    wait_for,
    write_big,
)
from seaweed import Seaweed, SeaweedUnavailable, start_seaweed

from stickyci.chunking import cut
from stickyci.digest import Digest
from stickyci.store.objects import decode_index

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1 << 10
_clients: dict[str, S3Client] = {}


def use_s3(env: Env, server: Seaweed, prefix: str) -> str:
    """Point the env's CLI runs at ``s3://BUCKET/PREFIX`` on ``server``; return the URL."""
    url = f"s3://{server.bucket}/{prefix}"
    env.environ.update({
        "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": server.region, "STICKYCI_S3_ENDPOINT": server.endpoint,
        "STICKYCI_STORE": url,
        # Nothing from this machine's AWS configuration may change what the CLI does.
        "AWS_CONFIG_FILE": str(env.root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(env.root / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_RETRY_MODE",
                "AWS_MAX_ATTEMPTS"):
        env.environ.pop(var, None)
    return url


def objects(server: Seaweed, prefix: str) -> dict[str, int]:
    """What the bucket holds under ``prefix``: blob name (``packs/…``) → size."""
    # One client per server: creating one costs more CPU than the listing it makes.
    s3 = _clients.get(server.endpoint) or _clients.setdefault(server.endpoint, server.client())
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=server.bucket,
                                                             Prefix=f"{prefix}/"):
        for o in page.get("Contents", []):
            name = o["Key"][len(prefix) + 1:]
            if not name.endswith("/"):  # a filer's directory marker, not a blob
                out[name] = o["Size"]
    return out


def in_ns(blobs: dict[str, int], namespace: str) -> dict[str, int]:
    return {n: size for n, size in blobs.items() if n.startswith(f"{namespace}/")}


# --- the server killed in the middle of a commit ----------------------------------------------


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[Seaweed]:
    """A server of this test's own, to be killed."""
    try:
        with start_seaweed(tmp_path / "sw") as server:
            yield server
    except SeaweedUnavailable as exc:
        pytest.skip(f"SeaweedFS unavailable: {exc}")


def test_server_killed_mid_commit_keeps_the_ref_and_gc_reclaims_the_upload(
        env: Env, private_server: Seaweed, tmp_path: Path) -> None:
    server, prefix = private_server, "killed"
    use_s3(env, server, prefix)
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    (ws / "version").write_text("one")
    (ws / "keep.bin").write_bytes(os.urandom(300 * KiB))
    first = env.json("disk", "commit", str(ws))
    assert first["generation"] == 1
    after_gen1 = objects(server, prefix)

    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    gen1_tree = tree_digest(ws)
    (ws / "version").write_text("two")
    write_big(ws, 128)  # incompressible: forked workers upload a few packs each
    gen2_tree = tree_digest(ws)

    # Two attempts instead of five: a dead server fails the commit after one short backoff.
    committing = Env(env.root, env.store, env.cache, {**env.environ, "AWS_MAX_ATTEMPTS": "2"})
    proc = start_commit(committing, ws)
    packs0 = len(in_ns(after_gen1, "packs"))
    try:
        wait_for(lambda: proc.poll() is not None
                 or len(in_ns(objects(server, prefix), "packs")) > packs0,
                 "the commit to upload its first pack", interval=0.002)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        out, err = proc.communicate(timeout=120)
    except BaseException:
        reap(proc)
        raise
    assert proc.returncode == 8, f"the commit was not cut short ({proc.returncode}): {err}"
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert server.endpoint in line, line

    # The same server, restarted on the same data at the same address.
    with start_seaweed(tmp_path / "sw", ports=server.ports):
        shown = env.json("disk", "show", "k")
        assert [(g["gen"], g["snapshot"]) for g in shown["generations"]] == [
            (1, first["snapshot"])]
        there, other = elsewhere(env, "cache2"), env.root / "other"
        mounted = there.json("disk", "mount", "k", str(other), "--strategy", "copy")
        assert (mounted["generation"], mounted["base_cached"]) == (1, False)
        assert tree_digest(other) == gen1_tree
        there.run("disk", "unmount", str(other))

        # What the dead commit uploaded is garbage that gc (grace 0) reclaims, and only that.
        left = objects(server, prefix)
        assert set(left) > set(after_gen1), "the killed commit uploaded nothing"
        # at least one whole pack: a pack is cut once it holds PACK_TARGET (16 MiB) or more
        assert sum(left.values()) > sum(after_gen1.values()) + 16 * (1 << 20)
        report = env.json("disk", "gc", "--grace", "0s")
        assert report["packs_deleted"] + report["orphans_deleted"] >= 1
        assert report["packs_repacked"] == 0
        now = objects(server, prefix)
        assert set(now) == set(after_gen1)  # the ref's bytes change with its last use
        assert in_ns(now, "packs") | in_ns(now, "index") == (in_ns(after_gen1, "packs")
                                                             | in_ns(after_gen1, "index"))

        # The killed commit's mount is still there, and committing it again goes through.
        assert tree_digest(ws) == gen2_tree
        retried = env.json("disk", "commit", str(ws))
        assert (retried["committed"], retried["generation"]) == (True, 2)
        assert retried["added"] == 33  # the big dir and its 32 files
        again = elsewhere(env, "cache3")
        again.json("disk", "mount", "k", str(other), "--strategy", "copy")
        assert tree_digest(other) == gen2_tree
        again.run("disk", "unmount", str(other))


# --- objects damaged in the bucket ------------------------------------------------------------


def _pack_and_location(server: Seaweed, prefix: str,
                       digest: Digest) -> tuple[str, list[tuple[Digest, int, int]], int, int]:
    """The store's only pack, its index entries, and where ``digest`` sits in it."""
    (pack,) = in_ns(objects(server, prefix), "packs")
    pack_id = pack.split("/", 1)[1]
    body = server.client().get_object(Bucket=server.bucket, Key=f"{prefix}/index/{pack_id}")
    entries = decode_index(f"index/{pack_id}", body["Body"].read())
    (loc,) = [(off, ln) for d, off, ln in entries if d == digest]
    return pack, entries, *loc


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_object_damaged_in_the_bucket_is_refused_and_named(
        env: Env, seaweed: Seaweed, damage: str) -> None:
    prefix = f"damaged-{uuid.uuid4().hex[:12]}"
    use_s3(env, seaweed, prefix)
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    # Incompressible, under the chunking minimum and the only small file (a bundle of one):
    # one raw object.
    payload = os.urandom(40 * KiB)
    (ws / "b.bin").write_bytes(payload)
    (ws / "a.txt").write_text("hello\n" * 20_000)  # too big for a bundle
    assert env.json("disk", "commit", str(ws))["generation"] == 1

    digest = Digest.of(payload)
    pack, entries, off, ln = _pack_and_location(seaweed, prefix, digest)
    s3, key = seaweed.client(), f"{prefix}/{pack}"
    data = bytearray(s3.get_object(Bucket=seaweed.bucket, Key=key)["Body"].read())
    cut = off + ln // 2
    if damage == "flip":
        data[cut] ^= 0x01
        named = {str(digest)}
    else:
        # A ranged read past the new end comes back short; whichever object after the cut
        # is read first (the manifest, if it sits later in the pack) is the one reported.
        del data[cut:]
        named = {str(d) for d, o, n in entries if o + n > cut}
    s3.put_object(Bucket=seaweed.bucket, Key=key, Body=bytes(data))

    there, ws2 = elsewhere(env, "cache2"), env.root / "ws2"
    proc = there.run("disk", "mount", "k", str(ws2), check=False)
    assert proc.returncode == 4, proc.stderr
    line = one_line_error(proc)
    assert "corrupt" in line or "truncated" in line, line
    assert any(n in line for n in named), line
    assert not ws2.exists() or list(ws2.iterdir()) == []
    assert not is_mount_record(there, ws2)


# --- gc and repack ------------------------------------------------------------------------------


def test_gc_repacks_a_mostly_dead_pack_on_s3(env: Env, seaweed: Seaweed) -> None:
    prefix = f"repack-{uuid.uuid4().hex[:12]}"
    use_s3(env, seaweed, prefix)
    ws = env.root / "ws"
    files = {f"f{i:02}.bin": os.urandom(80 * KiB) for i in range(24)}  # too big to bundle
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    for name, data in files.items():
        (ws / name).write_bytes(data)
    env.run("disk", "commit", str(ws))
    (pack1,) = in_ns(objects(seaweed, prefix), "packs")

    kept = dict(list(files.items())[:2])
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    for name in files.keys() - kept.keys():
        (ws / name).unlink()
    assert env.json("disk", "commit", str(ws))["removed"] == len(files) - len(kept)
    # The keep policy (3 generations) pushes generation 1, the only user of the rest, out.
    for _ in range(2):
        env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
        env.run("disk", "commit", str(ws), "--mode", "always")
    assert [g["gen"] for g in env.json("disk", "show", "k")["generations"]] == [2, 3, 4]

    before = objects(seaweed, prefix)
    report = env.json("disk", "gc", "--grace", "0s")
    assert (report["packs_repacked"], report["packs_deleted"]) == (1, 0), report
    after = objects(seaweed, prefix)
    pack1_id = pack1.split("/", 1)[1]
    assert pack1 not in after and f"index/{pack1_id}" not in after
    (repacked,) = set(in_ns(after, "packs")) - set(before)
    assert after[repacked] < 0.15 * before[pack1]  # 2 of the 24 files it held
    freed = sum(before.values()) - sum(after.values())
    assert freed > 0.8 * sum(len(d) for n, d in files.items() if n not in kept)
    index = seaweed.client().get_object(
        Bucket=seaweed.bucket, Key=f"{prefix}/index/{repacked.split('/', 1)[1]}")
    assert {d for d, _, _ in decode_index("index", index["Body"].read())} == {
        Digest.of(c) for d in kept.values() for c in cut(d)}  # 80 KiB: one chunk or two

    there, ws2 = elsewhere(env, "cache2"), env.root / "ws2"
    there.run("disk", "mount", "k", str(ws2), "--strategy", "copy")
    assert {p.name: p.read_bytes() for p in ws2.iterdir()} == kept
    there.run("disk", "unmount", str(ws2))
    # Nothing left to collect: a second gc changes nothing.
    again = env.json("disk", "gc", "--grace", "0s")
    assert (again["packs_repacked"], again["packs_deleted"], again["orphans_deleted"]) == (0, 0, 0)
    assert objects(seaweed, prefix).keys() == after.keys()
