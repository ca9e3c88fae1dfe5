"""A mount right after a commit on the same machine: the committed tree is the new base.

    python3 bench/adopt.py [--scale 1] [--runs 3] [--write docs/benchmarks.md]

As root (overlay), on the generated tree, through the Python API (no interpreter start-up):
a fresh disk is mounted, the tree copied in (not timed) and committed; the next mount is
timed; 1% of the files are changed (not timed), committed, and the next mount timed again.
Each mount's peer, in the same run, is the same mount with the base cache emptied first: what
every mount after a commit cost before the committed tree was adopted (a restore from the
store, its packs still in the page cache).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.cli import add_tree_options, command_line, parse_tree_args, parser, preflight
from harness.datasets import generated_dataset
from harness.fs import unmount_leftovers
from harness.proc import log
from harness.report import secs, write_section

KEY = "adopt"


def _change(ws: Path) -> None:
    """Append to every 100th file: a 1% change."""
    files = sorted(p for p in ws.rglob("*") if p.is_file() and not p.is_symlink())
    for p in files[::100]:
        with open(p, "ab") as f:
            f.write(b"changed\n")


def one_run(tree: Path, work: Path) -> dict[str, float]:
    """One full and one incremental commit, each followed by a mount, warm and cold."""
    from stickyci import disks

    os.environ["STICKYCI_CACHE_DIR"] = str(work / "cache")
    store = f"file://{work / 'store'}"
    ws = work / "ws"
    out: dict[str, float] = {}

    def mount(name: str) -> None:
        res = disks.mount("k", ws, strategy="overlay", store=store)
        assert res.strategy == "overlay"
        out[name] = res.seconds
        out[f"{name} cached"] = float(res.base_cached)

    def cold(name: str) -> None:
        disks.unmount(ws)
        shutil.rmtree(work / "cache" / "bases")
        mount(name)

    disks.mount("k", ws, strategy="overlay", store=store)
    subprocess.run(["cp", "-a", f"{tree}/.", str(ws)], check=True)
    subprocess.run(["sync"], check=True)
    out["full commit"] = disks.commit(ws).seconds
    mount("mount after full commit")
    cold("cold mount after full commit")
    _change(ws)
    subprocess.run(["sync"], check=True)
    out["incremental commit"] = disks.commit(ws).seconds
    mount("mount after incremental commit")
    cold("cold mount after incremental commit")
    disks.unmount(ws)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run, print the section, and write it with ``--write``."""
    p = parser(__doc__)
    add_tree_options(p, write="the adopt section", seed="seed of the generated tree")
    args = parse_tree_args(p, argv)
    if not preflight():
        sys.exit(2)
    ds = generated_dataset(args.work_dir, args.seed, args.scale)
    runs: list[dict[str, float]] = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            try:
                runs.append(one_run(ds.root, Path(tmp)))
            finally:
                unmount_leftovers(Path(tmp))
        log(f"run {i + 1}: {runs[-1]}")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rows = [("full commit (fresh disk)", "full commit", ""),
            ("next mount", "mount after full commit", "cold mount after full commit"),
            ("incremental commit (1% of files)", "incremental commit", ""),
            ("next mount", "mount after incremental commit",
             "cold mount after incremental commit")]
    lines = [f"## A mount right after a commit on the same machine ({ds.title})", "",
             f"- **Command:** `{command_line('bench/adopt.py', argv)}`",
             f"- **Date:** {time.strftime('%Y-%m-%d %H:%M')} (UTC); medians of {args.runs} "
             f"runs; data set: {ds.stats.summary()}.",
             "- Overlay, through the Python API. The peer of each mount is the same mount with "
             "the base cache emptied first: a restore from the store, as every mount after a "
             "commit was before the committed tree became the base.", "",
             "| operation | stickyci s | base cached | peer: restore s | stickyci / peer |",
             "|---|---:|---|---:|---:|"]
    for label, key, peer in rows:
        cached = "yes" if med.get(f"{key} cached") else ("no" if f"{key} cached" in med else "")
        p_s = f"{med[peer]:.3f}" if peer else ""
        factor = f"{med[key] / med[peer]:.3f}x" if peer else ""
        lines.append(f"| {label} | {secs(med[key])} | {cached} | {p_s} | {factor} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        write_section(args.write, KEY, section)


if __name__ == "__main__":
    main()
