"""How commands print: ``--json`` (one JSON document, or a JSON error body on failure) or text.

Every command group uses these, so they live below the groups rather than in one of them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from ..errors import StickyError

F = Callable[..., Any]


def json_option(f: F) -> F:
    """``--json``: print one JSON document instead of text, a JSON error body on failure."""

    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except StickyError as exc:
            if kwargs.get("as_json"):
                click.echo(json.dumps({"error": str(exc), "kind": type(exc).__name__,
                                       "exit_code": exc.exit_code}, sort_keys=True))
            raise

    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(run)


def emit(as_json: bool, data: Any, text: Callable[[Any], str]) -> None:
    """Print ``data`` as JSON or through ``text``."""
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text(data))
