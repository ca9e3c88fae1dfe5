"""Sticky disks through the CLI on a real S3-compatible server (SeaweedFS)."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import Env
from seaweed import Seaweed


def test_commit_mount_and_gc_on_s3(env: Env, seaweed: Seaweed) -> None:
    env.environ.update({
        "AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_DEFAULT_REGION": seaweed.region, "STICKYCI_S3_ENDPOINT": seaweed.endpoint,
        "STICKYCI_STORE": f"s3://{seaweed.bucket}/disks-cli",
    })
    ws = env.root / "ws"
    env.run("disk", "mount", "deps", str(ws), "--strategy", "copy")
    (ws / "lib").mkdir()
    payload = os.urandom(3 << 20)
    (ws / "lib" / "big.a").write_bytes(payload)
    (ws / "lib" / "small.h").write_text("int f(void);\n")
    first = env.json("disk", "commit", str(ws))
    assert first["committed"] and first["generation"] == 1

    env.environ["STICKYCI_CACHE_DIR"] = str(env.root / "another-machine")
    other = env.root / "other"
    mounted = env.json("disk", "mount", "deps", str(other), "--strategy", "copy")
    assert not mounted["base_cached"]  # restored from S3, not from a local base
    assert Path(other / "lib" / "big.a").read_bytes() == payload
    (other / "lib" / "small.h").unlink()
    second = env.json("disk", "commit", str(other))
    assert (second["generation"], second["removed"]) == (2, 1)
    assert [d["key"] for d in env.json("disk", "ls")] == ["deps"]
    env.run("disk", "rm", "deps")
    assert env.json("disk", "gc", "--grace", "0s")["packs_deleted"] >= 1
