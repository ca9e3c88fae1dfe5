"""``stickyci export github PIPELINE.yml``: the pipeline as a GitHub Actions workflow."""

from __future__ import annotations

import subprocess
from pathlib import Path

import click

from ..errors import UsageError
from ..pipeline import spec as spec_
from ..pipeline.github import DEFAULT_ACTION, DEFAULT_RUNS_ON, export_github
from .run import parse_sets


@click.group()
def export() -> None:
    """Write a pipeline in another CI system's terms."""


def repo_root(where: Path) -> Path:
    """The root of the git repository holding ``where`` (the current directory outside one)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=where,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return Path.cwd().resolve()
    return Path(out.stdout.strip()) if out.returncode == 0 else Path.cwd().resolve()


@export.command()
@click.argument("pipeline", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the workflow here (e.g. .github/workflows/ci.yml); default stdout.")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override a var.")
@click.option("--runs-on", multiple=True, metavar="LABEL",
              help=f"A runner label jobs run on; repeat for more "
                   f"(default: {', '.join(DEFAULT_RUNS_ON)}).")
@click.option("--action", default=DEFAULT_ACTION, show_default=True, metavar="REF",
              help="The sticky-disk action to use: OWNER/REPO/actions/sticky-disk@REF, or "
                   "./actions/sticky-disk in the stickyci repository.")
def github(pipeline: Path, output: Path | None, sets: tuple[str, ...],
           runs_on: tuple[str, ...], action: str) -> None:
    """A GitHub Actions workflow equivalent to PIPELINE.

    Jobs, needs, matrices (planned by a first job), disks (through the sticky-disk action),
    if: always() teardowns, timeouts and secrets; anything else is refused, naming the field.
    """
    spec = spec_.load(pipeline)
    file = pipeline.resolve()
    root = repo_root(file.parent)
    if not file.is_relative_to(root):
        raise UsageError(f"{pipeline} is not inside the repository at {root}; run the export "
                         "from the repository the workflow will live in")
    text = export_github(spec, pipeline, file.relative_to(root).as_posix(),
                         overrides=parse_sets(sets), action=action,
                         runs_on=runs_on or DEFAULT_RUNS_ON)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        click.echo(f"wrote {output}", err=True)
