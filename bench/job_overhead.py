"""A job's disk overhead: a warm mount and an unchanged commit, through the job's disk client.

    python3 bench/job_overhead.py [--runs 20]

Through ``DiskClient`` (a child of the per-process disk helper per operation) against the same
two operations as ``python -m stickyci disk … --json`` processes, what the client ran before
(issue 14, item 5). As root the mounts are overlays, otherwise copies. Medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stickyci.pipeline.diskclient import DiskClient, DiskFailure
from stickyci.pipeline.masking import Masker


def main() -> None:
    """Measure both ways, alternating, and print one Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    strategy = "overlay" if os.geteuid() == 0 else "copy"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.environ.update(STICKYCI_CACHE_DIR=str(work / "cache"),
                          STICKYCI_STORE=f"file://{work / 'store'}")
        client = DiskClient(None, None, Masker({}))
        ws = work / "ws"

        async def through_client() -> None:
            for got in (await client.mount("k", ws, strategy, False),
                        await client.commit(ws, "on-change")):
                assert not isinstance(got, DiskFailure), got

        def through_cli() -> None:
            for cmd in (["mount", "k", str(ws), "--strategy", strategy],
                        ["commit", str(ws), "--mode", "on-change"]):
                subprocess.run([sys.executable, "-m", "stickyci", "disk", *cmd, "--json"],
                               check=True, capture_output=True)

        asyncio.run(client.mount("k", ws, strategy, False))  # a first generation, and a base
        (ws / "f").write_text("x")
        asyncio.run(client.commit(ws, "on-change"))
        asyncio.run(through_client())  # the helper is started once per process: not timed
        new, old = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            asyncio.run(through_client())
            new.append(time.perf_counter() - start)
            start = time.perf_counter()
            through_cli()
            old.append(time.perf_counter() - start)
    n, o = statistics.median(new) * 1000, statistics.median(old) * 1000
    print(f"| warm mount + unchanged commit ({strategy}) | disk helper ms | "
          f"`stickyci disk` processes ms | helper / processes |\n|---|---:|---:|---:|\n"
          f"| median of {args.runs} | {n:.1f} | {o:.1f} | {n / o:.2f}x |")


if __name__ == "__main__":
    main()
