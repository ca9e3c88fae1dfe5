"""Planning: expand matrices into job instances, resolve needs, and check everything up front.

Every error a pipeline can have that does not depend on running it (unknown needs, cycles, empty
or invalid matrices, undefined template names, disks committed twice) is found here, before a
single step runs.
"""

from __future__ import annotations

import difflib
import graphlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .matrix import combinations
from .spec import JobSpec, MatrixSpec, PipelineSpec, parse_where, where
from .template import STATUS_FUNCTIONS, condition, render

MIN_SECRET = 4


@dataclass(slots=True)
class Instance:
    """One runnable job: a job of the file with one matrix combination."""

    id: str
    job: str
    spec: JobSpec
    matrix: dict[str, Any]
    needs: list[str]  # instance ids


@dataclass(slots=True)
class Plan:
    """A checked pipeline, ready for an executor."""

    spec: PipelineSpec
    file: Path
    sha: str
    vars: dict[str, Any]
    instances: dict[str, Instance]  # in a valid execution order
    secrets: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def base_dir(self) -> Path:
        """The directory of the pipeline file (relative paths in it start here)."""
        return self.file.parent

    def context(self, inst: Instance, needs: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        """The template context of an instance."""
        return {"vars": self.vars, "sha": self.sha, "matrix": inst.matrix, "needs": needs,
                "env": env, "job": {"name": inst.job, "id": inst.id}}

    def job_env(self, inst: Instance) -> dict[str, str]:
        """Pipeline then job env, rendered (they may use vars, matrix and sha)."""
        ctx = self.context(inst, {}, {})
        out = {k: render(v, ctx, f"env.{k}") for k, v in self.spec.env.items()}
        out.update({k: render(v, ctx, f"jobs.{inst.job}.env.{k}")
                    for k, v in inst.spec.env.items()})
        return out


def _label(combo: dict[str, Any]) -> str:
    return ",".join(str(v) for v in combo.values())


def _order(spec: PipelineSpec) -> list[str]:
    graph: dict[str, list[str]] = {}
    for name, job in spec.jobs.items():
        for need in job.needs:
            if need not in spec.jobs:
                raise UsageError(f"jobs.{name}.needs: unknown job {need!r}"
                                 f"{_did_you_mean(need, spec.jobs)}")
        graph[name] = list(job.needs)
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = " → ".join(exc.args[1])
        raise UsageError(f"jobs form a cycle: {cycle}; remove one of these needs") from exc


def _did_you_mean(name: str, known: dict[str, Any], what: str = "jobs") -> str:
    """``; did you mean `x`?`` for a close name, then the names there are."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"{hint} ({what}: {', '.join(sorted(known)) or 'none defined'})"


def _closure(spec: PipelineSpec, only: str) -> set[str]:
    if only not in spec.jobs:
        raise UsageError(f"--only {only}: no such job{_did_you_mean(only, spec.jobs)}")
    keep, todo = set(), [only]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(spec.jobs[name].needs)
    return keep


def build(spec: PipelineSpec, file: Path, *, sha: str, overrides: dict[str, str] | None = None,
          only: str | None = None) -> Plan:
    """Check ``spec`` and expand it into instances; errors say ``file:line: field: problem``."""
    try:
        return _build(spec, file, sha=sha, overrides=overrides, only=only)
    except UsageError as exc:
        message = str(exc)
        field = message.split(":", 1)[0]
        if " " not in field and ":" in message and not field.startswith("--"):
            raise UsageError(f"{where(file, parse_where(field))}: {message}") from exc
        raise UsageError(f"{file}: {message}") from exc


def _build(spec: PipelineSpec, file: Path, *, sha: str, overrides: dict[str, str] | None,
           only: str | None) -> Plan:
    variables = {**spec.vars, **(overrides or {})}
    missing = [s for s in spec.secrets if s not in os.environ]
    if missing:
        raise UsageError(f"secrets not set in the environment: {', '.join(missing)}; export "
                         "them before `stickyci run`")
    short = [s for s in spec.secrets if len(os.environ[s]) < MIN_SECRET]
    if short:
        # Masking a 1-3 character value would blank it out of every word in every log while
        # protecting nothing; such a value is no secret.
        raise UsageError(f"secrets shorter than {MIN_SECRET} characters cannot be masked: "
                         f"{', '.join(short)}; use longer values")
    plan = Plan(spec, file.resolve(), sha, variables, {},
                {s: os.environ[s] for s in spec.secrets})
    keep = _closure(spec, only) if only else set(spec.jobs)
    by_job: dict[str, list[str]] = {}
    for name in _order(spec):
        if name not in keep:
            continue
        job = spec.jobs[name]
        combos = _matrix(plan, name, job)
        needs = [i for n in job.needs for i in by_job[n]]
        ids: list[str] = []
        for combo in combos:
            inst_id = f"{name}[{_label(combo)}]" if job.matrix is not None else name
            if inst_id in plan.instances:
                inst_id = f"{name}[{len(ids)}]"
            plan.instances[inst_id] = Instance(inst_id, name, job, combo, needs)
            ids.append(inst_id)
        by_job[name] = ids
    _check_templates(plan)
    return plan


def _matrix(plan: Plan, name: str, job: JobSpec) -> list[dict[str, Any]]:
    if job.matrix is None:
        return [{}]
    where = f"jobs.{name}.matrix"
    ctx = {"vars": plan.vars, "sha": plan.sha}
    if isinstance(job.matrix, str):
        spec: MatrixSpec | None = plan.spec.matrices.get(job.matrix)
        if spec is None:
            raise UsageError(f"{where}: unknown matrix {job.matrix!r}"
                             f"{_did_you_mean(job.matrix, plan.spec.matrices, 'matrices')}")
        where = f"matrices.{job.matrix}"
    else:
        spec = job.matrix
    return combinations(spec, plan.base_dir, ctx, where)


def probe_needs(plan: Plan, inst: Instance) -> dict[str, Any]:
    """What ``needs`` looks like to templates, with placeholders for outputs not yet known."""
    return {n: {"outputs": {o: f"<{n}.{o}>" for o in plan.spec.jobs[n].outputs},
                "result": "success"}
            for n in plan.spec.jobs[inst.job].needs}


def _check_templates(plan: Plan) -> None:
    """Render every template once with placeholder outputs; collect disk-commit clashes."""
    committers: dict[str, str] = {}
    status = dict.fromkeys(STATUS_FUNCTIONS, True)
    for inst in plan.instances.values():
        env = plan.job_env(inst)
        ctx = plan.context(inst, probe_needs(plan, inst), env)
        prefix = f"jobs.{inst.job}"
        condition(inst.spec.if_, ctx, status, f"{prefix}.if")
        for i, disk in enumerate(inst.spec.disks):
            key = render(disk.key, ctx, f"{prefix}.disks[{i}].key")
            render(disk.path, ctx, f"{prefix}.disks[{i}].path")
            if disk.commit == "never" or disk.allow_race:
                continue
            other = committers.setdefault(key, inst.id)
            if other != inst.id:
                plan.warnings.append(
                    f"disk {key!r} is committed by both {other} and {inst.id} in one run: last "
                    "write wins. Give each committing chain its own disk, or set allow_race: true")
        for i, step in enumerate(inst.spec.steps):
            render(step.run, ctx, f"{prefix}.steps[{i}].run")
            condition(step.if_, ctx, status, f"{prefix}.steps[{i}].if")
            if step.working_directory:
                render(step.working_directory, ctx, f"{prefix}.steps[{i}].working_directory")
