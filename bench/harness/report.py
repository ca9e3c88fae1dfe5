"""Reports: figures formatted alike, targets checked, and a benchmark's section of the
benchmarks document written in place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .proc import log

MB = 1_000_000

# The document's header: every benchmark that writes a section puts it back in front.
DOC_HEADER = """# Benchmarks

Produced by `bench/disks.py`: every figure below comes from one invocation on the data set named
in its section, with stickyci and its peers run back to back on the same local copy of the data.
Each section is replaced in place when the benchmark is re-run with `--write`.

How the operations are measured:

- **full save**: stickyci mounts a new key on an empty store, the tree is copied in (not timed),
  the page cache is written back (`sync`, not timed), then only `commit` is timed: through the
  Python API for the overlay and copy strategies, and as a `python3 -m stickyci disk commit`
  process (interpreter start-up included). The peers read the same tree, already in the page
  cache: `tar -C DIR -cf - . | zstd -T0 -3`, `restic backup` into a fresh repository (restic
  0.14 has no `--no-scan`; its scanner runs alongside), and `cp -a`.
- **cold restore**: `sync; echo 3 > /proc/sys/vm/drop_caches` before each one. stickyci mounts
  with an empty base cache (`STICKYCI_CACHE_DIR` emptied), so the mount restores the snapshot
  from the store; restic restores with an empty local cache (`RESTIC_CACHE_DIR` wiped).
- **warm mount**: the snapshot's base is already in stickyci's base cache.
- **incremental save**: each run starts from a copy of the full save's store (and restic
  repository); the disk is mounted with its base cached, the change is applied (not timed) and
  the commit is timed. restic backs up the changed tree with the full save as its parent
  snapshot; tar+zstd archives the whole changed tree again.
- **+ sync s** is the wall time plus a `sync` run right after: stickyci fsyncs its packs, the
  peers leave their writes in the page cache, so this column compares durable saves.
- **stickyci / tool** is the stickyci reference row's median over the tool's median: below 1.00x
  stickyci is faster. MB/s is the tree's size over the wall time.
- **other CPU** is the CPU time processes other than the benchmark's (kernel threads included)
  used during the measurement, as a share of all CPUs. Before each measurement the benchmark
  waits (up to 60 s) for the machine to be idle, and it measures again (at most twice) when that
  share went over 25%.
- Deletions stickyci leaves running in the background after a commit are waited for (not
  timed) before the next measurement; their duration is reported.
"""


def write_section(path: Path, key: str, section: str) -> None:
    """Write or replace the section ``key`` of the benchmarks document at ``path``, between
    its ``<!-- bench:KEY:start -->`` and ``<!-- bench:KEY:end -->`` markers; the header is
    rewritten, the other sections are kept."""
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    body = section.strip("\n")
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    marker = text.find("<!-- bench:")
    text = DOC_HEADER + ("\n" + text[marker:] if marker >= 0 else "")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log(f"wrote the {key} section of {path}")


def secs(x: float) -> str:
    """Seconds, to the precision a wall time deserves."""
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"


def mb(x: float) -> str:
    """Bytes as MB (10^6)."""
    return f"{x / MB:,.1f}" if x >= MB else f"{x / MB:.3f}"


def ratio(a: float, b: float) -> str:
    """``a / b`` as a factor, ``n/a`` without a ``b``."""
    return f"{a / b:.2f}x" if b else "n/a"


def fnum(x: float) -> str:
    """A figure with the precision it deserves."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


@dataclass(slots=True)
class Target:
    """A target from the issue and how the run did against it."""

    name: str
    measured: float | None
    limit: float | None
    unit: str

    def verdict(self) -> tuple[str, str]:
        """PASS or MISS, and by how much."""
        if self.measured is None or self.limit is None:
            return "n/a", "peer not measured"
        ratio = self.measured / self.limit if self.limit else math.inf
        if self.measured <= self.limit:
            return "PASS", f"{ratio:.2f}x of the limit"
        return "MISS", f"{ratio:.2f}x the limit ({self.measured - self.limit:+,.3f} {self.unit})"


def target_table(found: list[Target]) -> str:
    """PASS/MISS per target."""
    lines = ["| target | measured | limit | result | margin |", "|---|---:|---:|---|---|"]
    for t in found:
        verdict, margin = t.verdict()
        m = "" if t.measured is None else f"{t.measured:,.3f} {t.unit}"
        lim = "" if t.limit is None else f"{t.limit:,.3f} {t.unit}"
        lines.append(f"| {t.name} | {m} | {lim} | **{verdict}** | {margin} |")
    return "\n".join(lines)
