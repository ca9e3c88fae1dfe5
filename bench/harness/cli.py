"""The command line every benchmark shares: its options, the checks before it starts, and the
command and start time its report records."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .datasets import DEFAULT_WORK
from .noise import add_noise_options
from .proc import log


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a benchmark's docstring, which it shows
    whole in ``--help``."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_tree_options(p: argparse.ArgumentParser, *, write: str, seed: str) -> None:
    """The options of a benchmark on the generated tree: ``--scale``, ``--seed``, ``--runs``,
    ``--work-dir``, ``--write`` (``write``: which section it writes) and the noise options."""
    p.add_argument("--scale", type=float, default=1.0,
                   help="file counts of the generated tree (1.0: ~1 GB, ~33k files)")
    p.add_argument("--seed", type=int, default=42, help=seed)
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                   help=f"cached data sets and scratch space (default {DEFAULT_WORK})")
    p.add_argument("--write", type=Path, metavar="MD",
                   help=f"write/replace {write} in a Markdown file")
    add_noise_options(p)


def parse_tree_args(p: argparse.ArgumentParser,
                    argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, refusing no runs and an empty tree."""
    args = p.parse_args(argv)
    if args.runs < 1 or args.scale <= 0:
        p.error("--runs must be >= 1 and --scale > 0")
    return args


def preflight(*tools: str, why_root: str = "overlay mounts and dropping the page cache") -> bool:
    """Whether this process is root and ``tools`` are installed; says what is missing."""
    if os.geteuid() != 0:
        log(f"this benchmark needs root: {why_root}")
        return False
    for tool in tools:
        if shutil.which(tool) is None:
            log(f"{tool} is not installed (apt-get install {tool})")
            return False
    return True


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command the report records: ``python3 bench/SCRIPT ARGS``."""
    return "python3 " + shlex.join(sys.argv if argv is None else [script, *argv])


def started_at() -> str:
    """Now, in UTC, to the minute: when the report says the run started."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
