"""The pipeline file: YAML validated by pydantic models; an error names file, line and field."""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError
from pydantic_core import ErrorDetails

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
    # What the step's shell leaves running when it exits: stopped then (stop), or kept for the
    # later steps and stopped when the job's steps are done (keep). See docs/pipelines.md.
    background: Literal["stop", "keep"] = "stop"


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
    # How long to wait for the scheduler and for a first worker; `--connect-timeout` wins.
    connect_timeout: Annotated[Duration, Field(gt=0)] = 10.0
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
            key = (*path, k.value)
            out[key] = k.start_mark.line + 1  # the key's line, not where its value starts
            out.update({p: ln for p, ln in _lines(v, key).items() if p != key})
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_lines(v, (*path, i)))
    return out


def load(path: Path) -> PipelineSpec:
    """Read and validate a pipeline file; raise ``UsageError`` naming file, line and field.

    A file with several problems gets them all in one error, one line each under a first line
    that counts them, so that fixing one typo does not just reveal the next.
    """
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
        lines = sorted(((where(path, loc, node), _dotted(loc), message)
                        for loc, message in _problems(exc.errors())),
                       key=lambda p: int(p[0].rsplit(":", 1)[1]))
        if len(lines) == 1:
            raise UsageError(": ".join(lines[0])) from exc
        # Every problem at once, one line each: a second run should not find a second typo.
        raise UsageError(f"{path}: {len(lines)} problems\n"
                         + "\n".join(f"  {': '.join(line)}" for line in lines)) from exc


_ALIASES = {"if_": "if", "from_": "from"}


def _problems(errors: list[ErrorDetails]) -> list[tuple[tuple[Any, ...], str]]:
    """pydantic's errors as (location, message), one per problem the user made.

    For a union (a matrix name or an inline matrix) pydantic reports every branch; the branch
    that got deepest is the one the user meant. A misspelt key is also reported as the missing
    field it should have been; the misspelling, with its suggestion, says both.
    """
    branches: dict[tuple[Any, ...], dict[str, list[ErrorDetails]]] = {}
    plain: list[ErrorDetails] = []
    for err in errors:
        tags, _ = _walk(err["loc"])
        if not tags:
            plain.append(err)
        else:
            union, tag = err["loc"][:tags[0]], str(err["loc"][tags[0]])
            branches.setdefault(union, {}).setdefault(tag, []).append(err)
    for union, by_branch in branches.items():
        depth = {tag: max(len(e["loc"]) for e in errs) for tag, errs in by_branch.items()}
        if list(depth.values()).count(max(depth.values())) == 1:
            plain += by_branch[max(depth, key=lambda t: depth[t])]
        else:  # every branch refused the value itself: say what each would have taken
            wants = [e["msg"] for errs in by_branch.values() for e in errs]
            merged = wants[0] + "".join(f" or {w.removeprefix('Input should be ')}"
                                        for w in wants[1:])
            plain.append({**by_branch[next(iter(by_branch))][0], "loc": union, "msg": merged})
    out: list[tuple[tuple[Any, ...], str]] = []
    meant: set[tuple[Any, ...]] = set()
    for err in plain:
        loc, message = err["loc"], err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            _, model = _walk(loc[:-1])
            names = ([f.alias or name for name, f in model.model_fields.items()]
                     if _is_model(model) else [])
            close = difflib.get_close_matches(str(loc[-1]), names, n=1)
            if close:
                message = f"unknown field; did you mean `{close[0]}`?"
                meant.add((*loc[:-1], close[0]))
            else:
                message = f"unknown field; fields here: {', '.join(names)}"
        out.append((loc, message))
    return [(_clean(loc), message) for loc, message in out
            if loc not in meant or not message.startswith("Field required")]


def _walk(loc: tuple[Any, ...]) -> tuple[list[int], Any]:
    """Follow pydantic's ``loc`` down the pipeline's models: the positions in it that name a
    union's branch (``matrix: str | MatrixSpec`` → ``str`` or ``MatrixSpec``), and the type
    at its end (None where it leaves the models)."""
    ann: Any = PipelineSpec
    tags = []
    for i, part in enumerate(loc):
        ann = _unwrap(ann)
        if get_origin(ann) in (Union, types.UnionType):
            tags.append(i)
            ann = next((a for a in get_args(ann) if getattr(_unwrap(a), "__name__", "") == part),
                       None)
        elif _is_model(ann):
            ann = next((f.annotation for name, f in ann.model_fields.items()
                        if part in (name, f.alias)), None)
        elif get_origin(ann) is list and isinstance(part, int):
            ann = get_args(ann)[0]
        elif get_origin(ann) is dict:
            ann = get_args(ann)[1]
        else:
            ann = None
        if ann is None:
            break
    return tags, _unwrap(ann)


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _unwrap(ann: Any) -> Any:
    """``Annotated[X, …]`` and ``X | None`` as ``X``."""
    while True:
        if get_origin(ann) is Annotated:
            ann = get_args(ann)[0]
        elif (get_origin(ann) in (Union, types.UnionType) and len(get_args(ann)) == 2
              and type(None) in get_args(ann)):
            ann = next(a for a in get_args(ann) if a is not type(None))
        else:
            return ann


def _clean(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A location as the user wrote it: no union branches or validator names, YAML keys."""
    tags = set(_walk(loc)[0])
    return tuple(_ALIASES.get(p, p) if isinstance(p, str) else p for i, p in enumerate(loc)
                 if i not in tags and not (isinstance(p, str) and p.startswith("function-")))


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
