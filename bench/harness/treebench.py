"""What the benchmarks on a tree of files share: a run dir holding a working copy of the data
set, rows of measurements that are taken again when the machine was busy, and the facts the
report needs (failures, trees restored wrong, peak disk use)."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from stickyci.errors import StickyError

from .datasets import Dataset, TreeStats
from .fs import disk_use, remove, unmount_leftovers
from .noise import attempt
from .proc import log, run
from .report import MB


class Measured(Protocol):
    """A row of measurements: one tool doing one operation, over the runs."""

    op: str
    tool: str
    other_cpu: list[float]
    retried: int

    def drop_last(self) -> None:
        """Forget the last run's figures (it is measured again)."""


R = TypeVar("R", bound=Measured)


class TreeBench(Generic[R]):
    """Runs the operations of one benchmark on one data set and keeps the rows (``rows``,
    keyed by operation and tool, filled by the subclass)."""

    def __init__(self, args: argparse.Namespace, ds: Dataset, run_dir: Path, *,
                 need: int = 0) -> None:
        self.args = args
        self.need = need  # the disk space a run needs: less free is warned about
        self.ds = ds
        self.run_dir = run_dir
        self.tree = run_dir / "tree"
        self.rows: dict[tuple[str, str], R] = {}
        self.facts: dict[str, Any] = {}
        self.disk_peak = 0

    def sample_disk(self) -> None:
        """Note the run dir's disk use (allocated, mounts skipped) at a moment it may peak."""
        self.disk_peak = max(self.disk_peak, disk_use(self.run_dir))

    def setup(self) -> None:
        """A clean run dir with a working copy of the data set (the peers read it)."""
        unmount_leftovers(self.run_dir)
        remove(self.run_dir)
        self.run_dir.mkdir(parents=True)
        free = shutil.disk_usage(self.run_dir).free
        if free < self.need:
            log(f"WARNING: {free / MB:,.0f} MB free under {self.run_dir}; a run needs about "
                f"{self.need / MB:,.0f} MB")
        log(f"copying the data set to {self.tree}")
        run(["cp", "-a", str(self.ds.root), str(self.tree)])

    def teardown(self) -> None:
        """Remove everything the run wrote, unless ``--keep``."""
        unmount_leftovers(self.run_dir)
        if not self.args.keep:
            remove(self.run_dir)

    def attempt(self, op: str, tool: str, measure: Callable[[], object]) -> None:
        """Run one measurement; redo it (at most twice) when other processes took more than
        ``--max-other-cpu`` of the CPUs meanwhile, so a busy neighbour does not set the median.
        One tool failing (a peer, or the CLI while src/ is being edited) must not lose the
        other measurements; the report lists the failure."""
        retried = attempt(f"{tool} ({op})", measure,
                          other=lambda: self.rows[(op, tool)].other_cpu[-1],
                          drop_last=lambda: self.rows[(op, tool)].drop_last(),
                          max_other=self.args.max_other_cpu,
                          errors=(RuntimeError, OSError, StickyError),
                          failures=self.facts.setdefault("failures", []))
        if retried:
            self.rows[(op, tool)].retried += retried

    def check_tree(self, root: Path, what: str) -> None:
        """Warn if a restored tree does not hold what the data set holds (counted, not timed)."""
        got, want = TreeStats.of(root), self.ds.stats
        if (got.files, got.bytes, got.symlinks) != (want.files, want.bytes, want.symlinks):
            log(f"WARNING: {what} restored {got.summary()}; expected {want.summary()}")
            self.facts.setdefault("mismatches", []).append(what)

    def retried_note(self) -> list[str]:
        """The report's line on measurements taken again, if any were."""
        retried = [f"{row.tool} ({row.op}) x{row.retried}" for row in self.rows.values()
                   if row.retried]
        if not retried:
            return []
        return [f"- **Re-measured** because other processes used more than "
                f"{self.args.max_other_cpu:.0%} of the CPUs meanwhile: {', '.join(retried)}."]
