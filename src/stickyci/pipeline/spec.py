"""The pipeline file: YAML validated by pydantic models; an error names file, line and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError

from ..errors import UsageError
from ..units import parse_duration

COMMIT_MODES = ("on-success", "always", "on-change", "if-missing", "never")
def _duration(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return parse_duration(str(value), bare_seconds=True)
    except UsageError:
        raise ValueError("a duration is seconds or a number with s, m, h or d (e.g. 90s, "
                         "10m)") from None


Duration = Annotated[float, BeforeValidator(_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class DiskSpec(_Model):
    """A disk a job mounts before its steps and commits after them."""

    key: StrictStr
    path: StrictStr
    commit: Literal["on-success", "always", "on-change", "if-missing", "never"] = "on-success"
    strategy: Literal["auto", "overlay", "reflink", "copy"] = "auto"
    # Two jobs committing one key in a run race (last write wins); say so to silence the warning.
    allow_race: bool = False
    # Restore the owners and setuid/setgid bits the snapshot records (`disk mount
    # --trust-owners`), e.g. for /nix; without it files belong to the user that mounts them.
    trust_owners: bool = False


class StepSpec(_Model):
    """One bash step."""

    name: StrictStr | None = None
    run: StrictStr
    if_: StrictStr = Field("success()", alias="if")
    timeout: Duration | None = None
    working_directory: StrictStr | None = None
    continue_on_error: bool = False
    env: dict[str, StrictStr] = {}


class MatrixSpec(_Model):
    """Combinations from a config file (JMESPath) or from inline axes, then include/exclude."""

    from_: StrictStr | None = Field(None, alias="from")
    select: StrictStr | None = None
    axes: dict[str, list[Any]] | None = None
    include: list[dict[str, Any]] = []
    exclude: list[dict[str, Any]] = []


class JobSpec(_Model):
    """A job: needs, condition, matrix, disks and steps."""

    needs: list[StrictStr] = []
    if_: StrictStr = Field("success()", alias="if")
    matrix: StrictStr | MatrixSpec | None = None
    max_parallel: int | None = Field(None, ge=1)
    disks: list[DiskSpec] = []
    env: dict[str, StrictStr] = {}
    timeout: Duration | None = None
    outputs: list[StrictStr] = []
    # Dask executor only: worker resources the job holds while it runs (``dask worker
    # --resources cpu=4``), and how many times it is retried when its worker dies under it.
    resources: dict[StrictStr, Annotated[float, Field(gt=0)]] = {}
    retries: int = Field(1, ge=0)
    steps: list[StepSpec] = Field(min_length=1)


class PipelineSpec(_Model):
    """A whole pipeline file."""

    name: StrictStr = "pipeline"
    executor: Literal["local", "dask"] = "local"  # `stickyci run --executor` wins
    scheduler: StrictStr | None = None  # the Dask scheduler; `--scheduler` wins
    env: dict[str, StrictStr] = {}
    vars: dict[str, Any] = {}
    secrets: list[StrictStr] = []
    matrices: dict[str, MatrixSpec] = {}
    jobs: dict[str, JobSpec] = Field(min_length=1)


def _lines(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map each key path in a YAML document to the line (1-based) where it appears."""
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[(*path, k.value)] = k.start_mark.line + 1
            out.update({p: ln for p, ln in _lines(v, (*path, k.value)).items() if p != path})
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_lines(v, (*path, i)))
    return out


def load(path: Path) -> PipelineSpec:
    """Read and validate a pipeline file; raise ``UsageError`` naming file, line and field."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read pipeline {path}: {exc.strerror}") from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{path}{at}: invalid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a pipeline is a mapping with at least `jobs`")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        # For a union (a matrix name or an inline matrix) pydantic reports every branch; the
        # deepest location is the one the user meant. A misspelt key is also reported as the
        # missing one it should have been; the misspelling is the more useful of the two.
        err = max(exc.errors(), key=lambda e: (len(e["loc"]), e["type"] == "extra_forbidden"))
        loc = tuple(_ALIASES.get(p, p) if isinstance(p, str) else p for p in err["loc"]
                    if not (isinstance(p, str) and (p in _TAGS or p.startswith("function-"))))
        raise UsageError(f"{where(path, loc, node)}: {_dotted(loc)}: {err['msg']}") from exc


_TAGS = {"str", "MatrixSpec"}
_ALIASES = {"if_": "if", "from_": "from"}


def _dotted(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") \
        or "(top level)"


def where(path: Path, loc: tuple[Any, ...], node: yaml.Node | None = None) -> str:
    """``file:line`` of the deepest part of ``loc`` that exists in the file."""
    if node is None:
        try:
            node = yaml.compose(path.read_text())
        except (OSError, yaml.YAMLError):
            node = None
    lines = _lines(node) if node else {}
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), 1)
    return f"{path}:{line}"


def parse_where(text: str) -> tuple[Any, ...]:
    """``jobs.build.steps[0].run`` → ``("jobs", "build", "steps", 0, "run")``."""
    return tuple(int(p) if p.isdigit() else p
                 for p in re.findall(r"[^.\[\]]+", text))
