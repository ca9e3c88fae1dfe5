"""``${{ … }}`` templates and ``if`` conditions: Jinja2 in a sandbox, strict about undefined names.

Only the ``${{ }}`` delimiters are active: block and comment syntax is moved out of the way, so
bash in a step (``${#array}``, ``{% raw %}``-looking text) is never taken for a template.

The sandbox is immutable (a template cannot change ``vars`` or any other value it is given,
so rendering one template never changes what the next one sees) and bounded: ``range``, ``*``
and ``**`` refuse results that would take the runner's memory or CPU. Every error, whatever
raised it, becomes one ``UsageError`` line naming the field.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import UsageError

# The largest range, repeated string or list, and power a template may build.
MAX_ITEMS = 100_000
MAX_POWER_BITS = 4096


class TemplateLimit(jinja2.TemplateRuntimeError):
    """A template asked for more than the sandbox allows."""


def _range(*args: int) -> range:
    items = range(*args)
    if len(items) > MAX_ITEMS:
        raise TemplateLimit(f"range() of {len(items)} items is over the limit of {MAX_ITEMS}")
    return items


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if (isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                        and len(seq) * count > MAX_ITEMS):
                    raise TemplateLimit(f"repeating a {type(seq).__name__} {count} times is "
                                        f"over the limit of {MAX_ITEMS} items")
            return operator.mul(left, right)
        if (isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
                and abs(left).bit_length() * right > MAX_POWER_BITS):
            raise TemplateLimit(f"{left} ** {right} is over the limit of {MAX_POWER_BITS} bits")
        return operator.pow(left, right)


_ENV = _Sandbox(
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
_ENV.globals["range"] = _range
STATUS_FUNCTIONS = ("success", "failure", "always", "cancelled")
_STATUS_CALL = re.compile(r"\b(success|failure|always|cancelled)\s*\(")


def render(text: str, context: Mapping[str, Any], where: str) -> str:
    """Render ``text``; an undefined name or a syntax error is a ``UsageError`` naming ``where``."""
    if "${{" not in text:
        return text
    try:
        return _ENV.from_string(text).render(context)
    except jinja2.UndefinedError as exc:
        raise UsageError(f"{where}: undefined template name: {_line(exc.message)}") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(f"{where}: template syntax error: {_line(exc.message)}") from exc
    except Exception as exc:
        # Whatever the expression raised (a sandbox refusal, 1/0, a bad type) is the template's
        # fault, reported like any other template error rather than as a traceback.
        raise UsageError(f"{where}: template error: {_describe(exc)}") from exc


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
        # bool() inside: it is where an undefined name used as the whole condition raises.
        return bool(_ENV.compile_expression(body, undefined_to_none=False)({**context, **funcs}))
    except jinja2.UndefinedError as exc:
        raise UsageError(f"{where}: undefined name in if: {_line(exc.message)}") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(f"{where}: invalid if expression {_line(repr(expr))}: "
                         f"{_line(exc.message)}") from exc
    except Exception as exc:
        raise UsageError(f"{where}: error in if expression: {_describe(exc)}") from exc


def _line(text: str | None) -> str:
    return " ".join((text or "").split())


def _describe(exc: Exception) -> str:
    if isinstance(exc, jinja2.TemplateError):
        return _line(str(exc))
    return _line(f"{type(exc).__name__}: {exc}")
