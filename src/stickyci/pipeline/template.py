"""``${{ … }}`` templates and ``if`` conditions: Jinja2 in a sandbox, strict about undefined names.

Only the ``${{ }}`` delimiters are active: block and comment syntax is moved out of the way, so
bash in a step (``${#array}``, ``{% raw %}``-looking text) is never taken for a template.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from ..errors import UsageError

_ENV = SandboxedEnvironment(
    variable_start_string="${{",
    variable_end_string="}}",
    block_start_string="<%stickyci-block",
    block_end_string="%>",
    comment_start_string="<%stickyci-comment",
    comment_end_string="%>",
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)
STATUS_FUNCTIONS = ("success", "failure", "always", "cancelled")
_STATUS_CALL = re.compile(r"\b(success|failure|always|cancelled)\s*\(")


def render(text: str, context: Mapping[str, Any], where: str) -> str:
    """Render ``text``; an undefined name or a syntax error is a ``UsageError`` naming ``where``."""
    if "${{" not in text:
        return text
    try:
        return _ENV.from_string(text).render(context)
    except jinja2.UndefinedError as exc:
        raise UsageError(f"{where}: undefined template name: {exc.message}") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(f"{where}: template syntax error: {exc.message}") from exc
    except jinja2.TemplateError as exc:
        raise UsageError(f"{where}: template error: {exc}") from exc


def condition(expr: str, context: Mapping[str, Any], status: Mapping[str, bool],
              where: str) -> bool:
    """Evaluate an ``if``: a Jinja2 expression (optionally wrapped in ``${{ }}``).

    ``status`` gives the values of ``success()``, ``failure()``, ``always()`` and
    ``cancelled()``. As in GitHub Actions, an expression that calls none of them is
    implicitly ``success() and (…)``.
    """
    body = expr.strip()
    if body.startswith("${{") and body.endswith("}}"):
        body = body[3:-2].strip()
    if not _STATUS_CALL.search(body):
        body = f"success() and ({body})"
    funcs = {name: (lambda v=status[name]: v) for name in STATUS_FUNCTIONS}
    try:
        value = _ENV.compile_expression(body, undefined_to_none=False)({**context, **funcs})
    except jinja2.UndefinedError as exc:
        raise UsageError(f"{where}: undefined name in if: {exc.message}") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(f"{where}: invalid if expression {expr!r}: {exc.message}") from exc
    return bool(value)
