"""``stickyci plan PIPELINE.yml``: check a pipeline and print its jobs and matrices, running
nothing (a workflow exported by ``stickyci export github`` reads the matrices from ``--json``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..pipeline import plan as plan_
from ..pipeline import spec as spec_
from .output import json_option
from .run import git_sha, parse_sets


@click.command()
@click.argument("pipeline", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--sha", help="Commit id for ${{ sha }} (default: git rev-parse HEAD).")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override a var.")
@json_option
def plan(pipeline: Path, sha: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Plan a pipeline: every check `stickyci run` makes first, then each job's instances.

    With --json, one line: {"sha", "jobs": {JOB: {"needs", "matrix", "instances"}},
    "warnings"}, where "matrix" is the list of a matrix job's combinations (null for a job
    without a matrix).
    """
    spec = spec_.load(pipeline)
    planned = plan_.build(spec, pipeline, sha=sha or git_sha(pipeline.resolve().parent),
                          overrides=parse_sets(sets))
    jobs: dict[str, dict[str, object]] = {}
    for name, job in spec.jobs.items():
        instances = [i for i in planned.instances.values() if i.job == name]
        jobs[name] = {"needs": list(job.needs),
                      "matrix": [i.matrix for i in instances] if job.matrix is not None
                      else None,
                      "instances": [i.id for i in instances]}
    if as_json:
        # One line: what a workflow step writes to $GITHUB_OUTPUT as name=value.
        click.echo(json.dumps({"sha": planned.sha, "jobs": jobs, "warnings": planned.warnings},
                              sort_keys=True))
        return
    for warning in planned.warnings:
        click.echo(f"stickyci: warning: {warning}", err=True)
    for name, job_plan in jobs.items():
        ids = job_plan["instances"]
        assert isinstance(ids, list)
        needs = job_plan["needs"]
        after = f" after {', '.join(needs)}" if isinstance(needs, list) and needs else ""
        click.echo(f"{name}: {len(ids)} instance{'s' if len(ids) != 1 else ''}{after}")
        if job_plan["matrix"] is not None:
            click.echo("".join(f"  {i}\n" for i in ids), nl=False)
