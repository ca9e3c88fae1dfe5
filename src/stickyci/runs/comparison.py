"""Cold-versus-warm comparison of runs: per-job medians, ratios, and a chart."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from .record import RunRecord


@dataclass(frozen=True, slots=True)
class Row:
    """One job's (or the total's) median cold and warm wall time."""

    name: str
    cold: float
    warm: float

    @property
    def ratio(self) -> float:
        """Warm over cold: 0.3 means the warm run took 30% of the cold one."""
        return self.warm / self.cold if self.cold else 0.0


def _job_seconds(runs: list[RunRecord]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for run in runs:
        per_job: dict[str, float] = {}
        for job in run.jobs:
            # A matrix job's time is the span of its instances: what the pipeline waited.
            if job.started_at:
                first = min(per_job.get(f"{job.job}:start", job.started_at), job.started_at)
                last = max(per_job.get(f"{job.job}:end", job.finished_at), job.finished_at)
                per_job[f"{job.job}:start"], per_job[f"{job.job}:end"] = first, last
        for key in [k for k in per_job if k.endswith(":start")]:
            name = key.removesuffix(":start")
            out.setdefault(name, []).append(per_job[f"{name}:end"] - per_job[key])
    return out


def compare(cold: list[RunRecord], warm: list[RunRecord]) -> list[Row]:
    """Median seconds per job, in pipeline order, then the total wall time."""
    c, w = _job_seconds(cold), _job_seconds(warm)
    names = list(dict.fromkeys(j.job for j in (cold or warm)[0].jobs))
    rows = [Row(n, statistics.median(c.get(n, [0.0])), statistics.median(w.get(n, [0.0])))
            for n in names]
    rows.append(Row("total", statistics.median(r.seconds for r in cold),
                    statistics.median(r.seconds for r in warm)))
    return rows


def table(rows: list[Row], runs: int) -> str:
    """A Markdown table of the comparison."""
    out = [f"| job | cold s (median of {runs}) | warm s | warm / cold |", "|---|---:|---:|---:|"]
    out += [f"| {r.name} | {r.cold:.2f} | {r.warm:.2f} | {r.ratio:.0%} |" for r in rows]
    return "\n".join(out)


def chart(rows: list[Row], path: Path, title: str) -> Path:
    """Grouped bars, cold and warm per job, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display here; imported late because it is slow to import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r.cold for r in rows], 0.4, label="cold")
    ax.bar([x + 0.2 for x in xs], [r.warm for r in rows], 0.4, label="warm")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(f"{r.ratio:.0%}", (x + 0.2, r.warm), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r.name for r in rows], rotation=20, ha="right")
    ax.set_ylabel("seconds (median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
