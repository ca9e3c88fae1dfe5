"""Matrix combinations: selected from a services config with JMESPath, or the product of axes."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jmespath
import jmespath.exceptions
import yaml

from ..errors import UsageError
from .spec import MatrixSpec
from .template import render


def combinations(spec: MatrixSpec, base_dir: Path, context: Mapping[str, Any],
                 where: str) -> list[dict[str, Any]]:
    """The list of combinations (dicts) a matrix stands for; never empty."""
    combos: list[dict[str, Any]] = []
    if spec.from_ is not None:
        combos = _select(spec, base_dir, context, where)
    elif spec.axes:
        names = list(spec.axes)
        combos = [dict(zip(names, values, strict=True))
                  for values in itertools.product(*(spec.axes[n] for n in names))]
    elif spec.select is not None:
        raise UsageError(f"{where}: `select` needs `from` (the config file to select from)")
    combos = [c for c in combos if not any(_matches(c, ex) for ex in spec.exclude)]
    combos += [dict(c) for c in spec.include]
    if not combos:
        raise UsageError(f"{where}: the matrix is empty; check `from`/`select`, `axes` and "
                         "`exclude`")
    return combos


def _matches(combo: Mapping[str, Any], pattern: Mapping[str, Any]) -> bool:
    return all(combo.get(k) == v for k, v in pattern.items())


def _select(spec: MatrixSpec, base_dir: Path, context: Mapping[str, Any],
            where: str) -> list[dict[str, Any]]:
    assert spec.from_ is not None
    path = base_dir / render(spec.from_, context, f"{where}.from")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"{where}.from: cannot read {path}: {exc.strerror}") from exc
    try:
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"{where}.from: {path} is not valid JSON/YAML: {exc}") from exc
    expr = spec.select or "@"
    try:
        found = jmespath.search(expr, config)
    except jmespath.exceptions.ParseError as exc:
        raise UsageError(f"{where}.select: JMESPath syntax error in {expr!r} at column "
                         f"{exc.lex_position}: {exc.msg}") from exc
    except jmespath.exceptions.JMESPathError as exc:
        raise UsageError(f"{where}.select: JMESPath error in {expr!r}: {exc}") from exc
    if not isinstance(found, list) or not all(isinstance(x, dict) for x in found):
        raise UsageError(f"{where}.select: {expr!r} must give a list of objects (use a "
                         "projection like `services[?binary].{service: name}`); got "
                         f"{type(found).__name__}")
    return [dict(x) for x in found]
