"""The server's own schedule: disks unused past their TTL are evicted, then gc reclaims them."""

from __future__ import annotations

from pathlib import Path

from helpers import Env, wait_for
from server import start_server


def test_scheduled_eviction_removes_stale_disks_and_gc_frees_their_packs(
        env: Env, tmp_path: Path) -> None:
    # Commit straight to the store the server will serve, then let the server's schedule run.
    (env.root / "w").mkdir()
    env.run("disk", "mount", "stale", str(env.root / "w"), "--strategy", "copy")
    (env.root / "w" / "f").write_bytes(b"x" * 300_000)
    env.run("disk", "commit", str(env.root / "w"))
    packs = env.store / "packs"
    assert any(packs.iterdir())

    args = ["--evict-after", "1s", "--evict-every", "1s", "--gc-grace", "0s"]
    with start_server(tmp_path / "server", store_url=f"file://{env.store}", args=args) as server, \
            server.client() as client:
        wait_for(lambda: not client.get("/v1/disks").json()["disks"], "the disk to be evicted",
                 interval=0.1)
        assert client.get("/v1/disks").json()["disks"] == []
        metrics = client.get("/metrics").text
        assert 'stickyci_evictions_total{kind="disk"} 1.0' in metrics
        # The gc after the eviction reclaims the disk's packs.
        wait_for(lambda: not any(packs.iterdir()), "gc to delete the packs", interval=0.1)
        assert not any(packs.iterdir())
