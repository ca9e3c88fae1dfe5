"""``stickyci runs ls`` and ``stickyci runs show RUN``."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click

from ..pipeline.summary import render_markdown
from ..runs.history import History


@click.group()
def runs() -> None:
    """Pipeline runs recorded on this machine."""


@runs.command("ls")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(limit: int, as_json: bool) -> None:
    """List recent runs, newest first."""
    rows = History().list(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no runs")
        return
    click.echo(f"{'RUN':26} {'PIPELINE':16} {'STATE':10} {'KIND':5} {'JOBS':>5} {'FAILED':>6} "
               f"{'SECONDS':>8}  STARTED")
    for r in rows:
        started = dt.datetime.fromtimestamp(r["started_at"]).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{r['id']:26} {r['pipeline'][:16]:16} {r['state']:10} "
                   f"{'cold' if r['cold'] else 'warm':5} {r['jobs']:>5} {r['failed']:>6} "
                   f"{r['seconds']:>8.1f}  {started}")


@runs.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(run_id: str, as_json: bool) -> None:
    """Show a run (an id or a unique prefix): its summary."""
    record = History().get(run_id)
    doc: Any = record.to_dict()
    click.echo(json.dumps(doc, indent=2) if as_json else render_markdown(record))
