"""Planning: every bad pipeline is a one-line error naming file, line and field, before any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stickyci.errors import UsageError
from stickyci.pipeline import plan, spec


def _plan(tmp_path: Path, text: str, **kw: object) -> plan.Plan:
    f = tmp_path / "p.yml"
    f.write_text(text)
    return plan.build(spec.load(f), f, sha="abc123", **kw)  # type: ignore[arg-type]


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(UsageError) as exc:
        _plan(tmp_path, text)
    message = str(exc.value)
    assert "\n" not in message
    return message


SERVICES = {"services": [
    {"name": "api", "binary": True, "port": 1},
    {"name": "web", "binary": True, "port": 2},
    {"name": "docs", "binary": False},
    {"name": "worker", "binary": True, "port": 3},
]}


def test_matrix_selected_with_jmespath_include_exclude(tmp_path: Path) -> None:
    (tmp_path / "services.json").write_text(json.dumps(SERVICES))
    p = _plan(tmp_path, """
matrices:
  bins:
    from: services.json
    select: "services[?binary].{service: name, port: port}"
    exclude: [{service: web}]
    include: [{service: extra, port: 9}]
jobs:
  build:
    matrix: bins
    steps: [{run: "echo ${{ matrix.service }}"}]
  deploy:
    needs: [build]
    steps: [{run: "true"}]
""")
    assert list(p.instances) == ["build[api,1]", "build[worker,3]", "build[extra,9]", "deploy"]
    assert p.instances["deploy"].needs == ["build[api,1]", "build[worker,3]", "build[extra,9]"]
    assert p.instances["build[worker,3]"].matrix == {"service": "worker", "port": 3}


def test_inline_axes_are_a_product(tmp_path: Path) -> None:
    p = _plan(tmp_path, """
jobs:
  t:
    matrix: {axes: {os: [a, b], opt: [0, 2]}, exclude: [{os: b, opt: 0}]}
    steps: [{run: "true"}]
""")
    assert [i.matrix for i in p.instances.values()] == [
        {"os": "a", "opt": 0}, {"os": "a", "opt": 2}, {"os": "b", "opt": 2}]


def test_only_keeps_the_job_and_its_needs(tmp_path: Path) -> None:
    p = _plan(tmp_path, """
jobs:
  a: {steps: [{run: "true"}]}
  b: {needs: [a], steps: [{run: "true"}]}
  c: {needs: [a], steps: [{run: "true"}]}
""", only="b")
    assert list(p.instances) == ["a", "b"]


def test_set_overrides_vars(tmp_path: Path) -> None:
    (tmp_path / "small.json").write_text(json.dumps({"services": [{"name": "x"}]}))
    p = _plan(tmp_path, """
vars: {services: missing.json}
jobs:
  a:
    matrix: {from: "${{ vars.services }}", select: "services[].{s: name}"}
    steps: [{run: "true"}]
""", overrides={"services": "small.json"})
    assert list(p.instances) == ["a[x]"]


@pytest.mark.parametrize(("text", "needle"), [
    ("jobs:\n  a:\n    needs: [zz]\n    steps: [{run: x}]\n",
     "p.yml:3: jobs.a.needs: unknown job 'zz'"),
    ("jobs:\n  a:\n    needs: [b]\n    steps: [{run: x}]\n  b:\n    needs: [a]\n"
     "    steps: [{run: x}]\n", "cycle: "),
    ("jobs:\n  a:\n    steps:\n      - run: [1, 2]\n",
     "p.yml:4: jobs.a.steps[0].run: Input should be a valid string"),
    ("jobs:\n  a:\n    steps:\n      - run: ok\n      - run: echo ${{ vars.nope }}\n",
     "p.yml:5: jobs.a.steps[1].run: undefined template name"),
    ("jobs:\n  a:\n    disks: [{key: '${{ matrix.x }}', path: d}]\n    steps: [{run: x}]\n",
     "jobs.a.disks[0].key: undefined template name"),
    ("jobs:\n  a:\n    matrix: {from: s.json, select: 'services[?binary'}\n"
     "    steps: [{run: x}]\n", "JMESPath syntax error"),
    ("jobs:\n  a:\n    matrix: {from: s.json, select: 'services[?nothing]'}\n"
     "    steps: [{run: x}]\n", "the matrix is empty"),
    ("jobs:\n  a:\n    matrix: {from: s.json, select: 'services[0].name'}\n"
     "    steps: [{run: x}]\n", "must give a list of objects"),
    ("jobs:\n  a:\n    matrix: nope\n    steps: [{run: x}]\n", "unknown matrix 'nope'"),
    ("jobs:\n  a:\n    timeout: soon\n    steps: [{run: x}]\n",
     "jobs.a.timeout: a duration is seconds"),
    ("connect_timeout: soon\njobs: {a: {steps: [{run: x}]}}\n",
     "p.yml:1: connect_timeout: a duration is seconds"),
    ("connect_timeout: 0s\njobs: {a: {steps: [{run: x}]}}\n",
     "p.yml:1: connect_timeout: Input should be greater than 0"),
    ("jobs:\n  a:\n    disks: [{key: k, path: d, commit: sometimes}]\n    steps: [{run: x}]\n",
     "p.yml:3: jobs.a.disks[0].commit"),
    ("jobs:\n  a:\n    steps: []\n", "jobs.a.steps"),
    ("jobs:\n  a:\n    if: success( and\n    steps: [{run: x}]\n", "invalid if expression"),
    ("jobs:\n  a: [\n", "invalid YAML"),
    ("jobs:\n  a:\n    stpes: [{run: x}]\n",
     "p.yml:3: jobs.a.stpes: unknown field; did you mean `steps`?"),
])
def test_bad_pipelines(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "s.json").write_text(json.dumps(SERVICES))
    assert needle in _error(tmp_path, text)


def test_two_jobs_committing_one_disk_warn_naming_both(tmp_path: Path) -> None:
    p = _plan(tmp_path, """
jobs:
  a: {disks: [{key: shared, path: d}], steps: [{run: x}]}
  b: {disks: [{key: shared, path: d}], steps: [{run: x}]}
  c: {disks: [{key: shared, path: d, commit: never}], steps: [{run: x}]}
  d: {disks: [{key: other, path: d, allow_race: true}], steps: [{run: x}]}
""")
    assert len(p.warnings) == 1
    assert "'shared'" in p.warnings[0] and " a and b " in p.warnings[0]


def test_missing_secret_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STICKYCI_TEST_SECRET", raising=False)
    message = _error(tmp_path, "secrets: [STICKYCI_TEST_SECRET]\njobs: {a: {steps: [{run: x}]}}")
    assert "STICKYCI_TEST_SECRET" in message


def test_short_secret_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYCI_TEST_SECRET", "x")
    message = _error(tmp_path, "secrets: [STICKYCI_TEST_SECRET]\njobs: {a: {steps: [{run: x}]}}")
    assert "cannot be masked: STICKYCI_TEST_SECRET" in message
