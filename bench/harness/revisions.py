"""Revisions of stickyci to measure side by side: this checkout, or ``git archive`` of a commit."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .fs import remove
from .proc import REPO, run


@dataclass
class Revision:
    """A stickyci source tree whose CLI (and server) are measured."""

    label: str
    src: Path

    def environ(self, **extra: str) -> dict[str, str]:
        """The environment that runs this revision's ``stickyci``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("STICKYCI_")}
        return {**env, "PYTHONPATH": str(self.src), **extra}

    def cli(self, *args: str) -> list[str]:
        """``stickyci ARGS`` of this revision."""
        return [sys.executable, "-m", "stickyci", *args]


THIS = Revision("this checkout", REPO / "src")


def revision_tree(work: Path, rev: str) -> Revision:
    """``git archive`` of ``rev``'s ``src/`` into the work dir (cached by commit)."""
    repo = str(REPO)
    commit = run(["git", "-C", repo, "rev-parse", "--short", rev]).stdout.decode().strip()
    dest = work / "revisions" / commit
    if not (dest / "src" / "stickyci").is_dir():
        remove(dest)
        dest.mkdir(parents=True)
        run(f"git -C {shlex.quote(repo)} archive {shlex.quote(commit)} src "
            f"| tar -x -C {shlex.quote(str(dest))}")
    return Revision(commit, dest / "src")
