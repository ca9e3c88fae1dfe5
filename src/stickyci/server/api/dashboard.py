"""The dashboard (``/ui/…``): the runs the server was told about, and its disks, caches and
store over time (computed in ``dashboard_store.py``), as pages for a browser.

Pages are rendered here with Jinja2 (autoescaped: job names, step names and log lines are text,
never markup) and need no front-end build: one small script of our own polls a running run's
body and swaps it in. A page needs a token, entered once in a form and kept in an HttpOnly,
SameSite=Strict, Secure cookie (or no token with ``--anonymous-read``); it shows only the runs,
disks and caches the token may read. No page can be framed, and the content security policy
allows no script but our own file.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ...errors import AuthError, NotFound
from ...runs import (
    FINISHED,
    PENDING,
    QUEUED,
    RUNNING,
    JobRecord,
    LogTail,
    RunRecord,
    compare,
    duration,
    failing_step,
    failures,
    race_warnings,
)
from ...units import format_size
from ..auth import Principal
from ..history import evictions_of
from ..state import Api, ServerState, read_limited
from ..visibility import sees_everything
from .dashboard_store import (
    DISK_SORTS,
    STORE_WINDOWS,
    WINDOWS,
    Sharing,
    cache_page,
    disk_page,
    store_page,
)
from .runs import RUNS_DB, RunStore, filter_of

COOKIE = "stickyci_token"
COOKIE_DAYS = 30
_HERE = Path(__file__).resolve().parent.parent / "dashboard"
_STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
_STATES = frozenset({PENDING, QUEUED, RUNNING, *FINISHED})
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a form sends "Origin: null", and the
    # login checks the Origin.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def routes(server: ServerState) -> list[Route]:
    """The dashboard's pages (runs, disks, caches, the store), its login, and its two
    static files."""
    ui = Dashboard(server, RunStore(server.cfg.state_dir / RUNS_DB))
    return [
        Route("/", ui.home, methods=["GET"]),
        Route("/ui/login", ui.login_form, methods=["GET"]),
        Route("/ui/login", ui.login, methods=["POST"]),
        Route("/ui/logout", ui.logout, methods=["POST"]),
        Route("/ui/runs", ui.runs_page, methods=["GET"]),
        Route("/ui/runs/{run_id}", ui.run_page, methods=["GET"]),
        Route("/ui/runs/{run_id}/body", ui.run_body, methods=["GET"]),
        Route("/ui/compare", ui.compare_page, methods=["GET"]),
        Route("/ui/disks", ui.disks_page, methods=["GET"]),
        Route("/ui/caches", ui.caches_page, methods=["GET"]),
        Route("/ui/store", ui.store_page, methods=["GET"]),
        Route("/ui/static/{name}", ui.static, methods=["GET"]),
    ]


@dataclass(frozen=True, slots=True)
class Bar:
    """One stretch of a job on the timeline, in percent of the run's span."""

    kind: str  # queue, mount, step, failed, commit
    x: float
    width: float
    title: str


@dataclass(slots=True)
class TimelineRow:
    """One job on the timeline."""

    job: JobRecord
    state: str
    critical: bool
    bars: list[Bar] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Failure:
    """A job that did not succeed, its failing step and that step's log tail."""

    job: JobRecord
    step: str
    tail: str


@dataclass(frozen=True, slots=True)
class DiskRow:
    """How one disk of one job started and ended."""

    job: str
    key: str
    start: str  # cold, empty, cached, restored, not mounted
    mount: str
    commit: str


def state_class(state: str) -> str:
    """A state as a CSS class name: only states we know, whatever a record says."""
    return state if state in _STATES else "unknown"


def critical_path(run: RunRecord, now: float) -> set[str]:
    """The chain of jobs that decided the run's length: from the job that ended last, back
    through the need of each that ended last."""
    recs = {j.id: j for j in run.jobs}

    def end(j: JobRecord) -> float:
        return j.finished_at or now

    current = max((j for j in run.jobs if j.started_at), key=end, default=None)
    path: set[str] = set()
    while current is not None and current.id not in path:
        path.add(current.id)
        needs = [recs[n] for n in current.needs if n in recs and recs[n].started_at]
        current = max(needs, key=end, default=None)
    return path


def timeline(run: RunRecord, now: float) -> tuple[list[TimelineRow], float]:
    """Each job split into queue, mount, steps and commit, placed on the run's span; the span
    in seconds."""
    start = run.started_at
    end = max([run.finished_at or now, *(j.finished_at for j in run.jobs)])
    span = max(end - start, 1e-3)
    critical = critical_path(run, now)

    def bar(kind: str, t0: float, seconds: float, title: str) -> Bar:
        x = min(100.0, max(0.0, 100 * (t0 - start) / span))
        return Bar(kind, round(x, 3), round(max(0.3, min(100 - x, 100 * seconds / span)), 3),
                   title)

    rows = []
    for job in run.jobs:
        row = TimelineRow(job, state_class(job.state), job.id in critical)
        if job.started_at:
            if job.queued_at and job.started_at > job.queued_at:
                row.bars.append(bar("queue", job.queued_at, job.started_at - job.queued_at,
                                    f"queued {duration(job.queue_seconds)}"))
            mount = sum(d.mount_seconds for d in job.disks)
            if mount:
                row.bars.append(bar("mount", job.started_at, mount, f"mount {duration(mount)}"))
            for step in job.steps:
                if step.started_at:
                    seconds = (now - step.started_at if step.state == RUNNING
                               else step.seconds)
                    kind = "failed" if step.state in ("failure", "timed_out") else "step"
                    row.bars.append(bar(kind, step.started_at, seconds,
                                        f"{step.name}: {step.state} {duration(seconds)}"))
            commit = sum(d.commit_seconds for d in job.disks)
            if commit and job.finished_at:
                row.bars.append(bar("commit", job.finished_at - commit, commit,
                                    f"commit {duration(commit)}"))
        rows.append(row)
    return rows, span


def disk_rows(run: RunRecord) -> list[DiskRow]:
    """Every disk of every job, and whether it started cold, empty, cached or restored."""
    out = []
    for job in run.jobs:
        for d in job.disks:
            start = ("not mounted" if not d.strategy else "cold" if run.cold
                     else "empty" if d.fresh else "cached" if d.base_cached else "restored")
            commit = (f"generation {d.generation}, {d.stored_bytes} bytes stored"
                      if d.committed else d.commit_reason or d.error or "-")
            out.append(DiskRow(job.id, d.key, start,
                               duration(d.mount_seconds) if d.strategy else "-", commit))
    return out


def failure_rows(run: RunRecord, tails: list[LogTail]) -> list[Failure]:
    """The jobs that did not succeed, each with its failing step's log tail."""
    by_step = {(t.job, t.step): t.text for t in tails}
    out = []
    for job in failures(run):
        step = failing_step(job)
        n = next((i for i, s in enumerate(job.steps) if s is step), -1)
        out.append(Failure(job, step.name if step else "", by_step.get((job.id, n), "")))
    return out


@dataclass(frozen=True, slots=True)
class CompareRow:
    """One job's median seconds cold and warm, and their bars' lengths in percent."""

    name: str
    cold: float
    warm: float
    ratio: float
    cold_width: float
    warm_width: float


def compare_rows(cold: list[RunRecord], warm: list[RunRecord]) -> list[CompareRow]:
    """Per-job medians of cold and warm runs (as ``stickyci bench`` prints them), scaled to
    the longest; empty unless there are runs of both kinds."""
    if not cold or not warm:
        return []
    rows = compare(cold, warm)
    longest = max([r.cold for r in rows] + [r.warm for r in rows] + [1e-9])
    return [CompareRow(r.name, r.cold, r.warm, r.ratio, round(100 * r.cold / longest, 3),
                       round(100 * r.warm / longest, 3)) for r in rows]


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "-"


def _safe_next(target: str) -> str:
    # Only a page of ours: an open redirect would send a fresh login anywhere.
    return target if target.startswith("/ui/") and not target.startswith("/ui//") and \
        "\\" not in target else "/ui/runs"


class Dashboard(Api):
    """The handlers of the dashboard."""

    def __init__(self, server: ServerState, store: RunStore) -> None:
        super().__init__(server)
        self.store = store
        self.sharing = Sharing(server.backend)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined)
        self.env.globals.update(duration=duration, when=_when, state_class=state_class,
                                quote=quote, size=format_size)
        self.static_files = {name: (_HERE / "static" / name).read_bytes() for name in _STATIC}

    def _page(self, template: str, status: int = 200, /, **context: object) -> Response:
        html = self.env.get_template(template).render(**context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def _viewer(self, request: Request) -> Principal:
        """Who is looking: the cookie's token, else an Authorization header, else anonymous
        if the server allows it; ``AuthError`` otherwise."""
        token = request.cookies.get(COOKIE)
        principal = self.server.tokens.authenticate(
            f"Bearer {token}" if token else request.headers.get("authorization"))
        request.state.principal = principal.id
        return principal

    def _to_login(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?{urlencode({'next': target})}", status_code=303,
                                headers=SECURITY_HEADERS)

    async def home(self, request: Request) -> Response:
        """``/``: the runs."""
        return RedirectResponse("/ui/runs", status_code=303, headers=SECURITY_HEADERS)

    async def login_form(self, request: Request) -> Response:
        """The form a token is entered in, once."""
        return self._page("login.html", next=_safe_next(request.query_params.get("next", "")),
                          error="")

    async def login(self, request: Request) -> Response:
        """Check the token and keep it in the cookie; back to the page that asked."""
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            # A form on another site must not log a browser in with the other site's token.
            return self._page("login.html", 403, next="/ui/runs",
                              error="a login must come from this server's own page")
        form = parse_qs((await read_limited(request, 8192, "a login form")).decode(
            errors="replace"))
        token = form.get("token", [""])[0].strip()
        target = _safe_next(form.get("next", [""])[0])
        try:
            principal = self.server.tokens.authenticate(f"Bearer {token}" if token else None)
        except AuthError as exc:
            return self._page("login.html", 401, next=target, error=str(exc))
        request.state.principal = principal.id
        response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(COOKIE, token, max_age=COOKIE_DAYS * 86400, path="/ui",
                            secure=True, httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request) -> Response:
        """Forget the cookie."""
        response = RedirectResponse("/ui/login", status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/ui", secure=True, httponly=True,
                               samesite="strict")
        return response

    async def runs_page(self, request: Request) -> Response:
        """The newest runs first, filtered by pipeline, state and sha."""
        try:
            who = self._viewer(request)
        except AuthError:
            return self._to_login(request)
        f = filter_of(request)
        runs = await self.call(self.store.list, who, f)
        pipelines = await self.call(self.store.pipelines, who)
        return self._page("runs.html", runs=runs, f=f, pipelines=pipelines,
                          states=sorted(_STATES - {PENDING, QUEUED}), who=who)

    async def compare_page(self, request: Request) -> Response:
        """A pipeline's cold runs against its warm runs: per-job medians, as a chart."""
        try:
            who = self._viewer(request)
        except AuthError:
            return self._to_login(request)
        pipelines = await self.call(self.store.pipelines, who)
        name = request.query_params.get("pipeline") or (pipelines[0] if pipelines else "")
        cold = await self.call(self.store.finished, who, name, "cold")
        warm = await self.call(self.store.finished, who, name, "warm")
        return self._page("compare.html", who=who, pipelines=pipelines, pipeline=name,
                          cold=len(cold), warm=len(warm), rows=compare_rows(cold, warm))

    async def run_page(self, request: Request) -> Response:
        """One run: its timeline, failures, races and disks; live while it runs."""
        try:
            who = self._viewer(request)
        except AuthError:
            return self._to_login(request)
        try:
            return self._page("run.html", **await self._run_context(request, who))
        except NotFound as exc:
            return self._page("error.html", 404, who=who, error=str(exc))

    async def run_body(self, request: Request) -> Response:
        """The part of a run's page that changes while it runs, for the page's poller."""
        try:
            who = self._viewer(request)
        except AuthError:
            return Response("log in again", status_code=401, headers=SECURITY_HEADERS)
        try:
            return self._page("run_body.html", **await self._run_context(request, who))
        except NotFound as exc:
            return Response(str(exc), status_code=404, headers=SECURITY_HEADERS)

    async def _run_context(self, request: Request, who: Principal) -> dict[str, object]:
        report = await self.call(self.store.get, request.path_params["run_id"], who)
        run, now = report.record, time.time()
        rows, span = timeline(run, now)
        return {"run": run, "rows": rows, "span": span, "who": who,
                "live": run.state == RUNNING, "failures": failure_rows(run, report.tails),
                "races": race_warnings(run), "disks": disk_rows(run)}

    async def disks_page(self, request: Request) -> Response:
        """The disks the token may read: generations, size, bytes shared, last use, who
        committed."""
        try:
            who = self._viewer(request)
        except AuthError:
            return self._to_login(request)
        q = request.query_params
        prefix, sort = q.get("key", "").strip(), q.get("sort", "key")
        sort = sort if sort in DISK_SORTS else "key"
        page = await self.call(disk_page, self.backend, self.sharing, who, prefix, sort)
        return self._page("disks.html", who=who, page=page, prefix=prefix, sort=sort,
                          sorts=DISK_SORTS)

    async def caches_page(self, request: Request) -> Response:
        """Each cache the token may read over time: hit rate, bytes served; evictions."""
        try:
            who = self._viewer(request)
        except AuthError:
            return self._to_login(request)
        metrics = self.server.metrics
        page = await self.call(cache_page, self.server.history, metrics.caches.peek(),
                               evictions_of(metrics), who,
                               request.query_params.get("window", "1h"), time.time())
        return self._page("caches.html", who=who, page=page, windows=list(WINDOWS))

    async def store_page(self, request: Request) -> Response:
        """The store's size over time and what each gc reclaimed (a token that sees
        everything: they are of the whole store)."""
        try:
            who = self._viewer(request)
        except AuthError:
            return self._to_login(request)
        if not sees_everything(who):
            return self._page("store.html", who=who, page=None, windows=list(STORE_WINDOWS))
        page = await self.call(store_page, self.server.history,
                               request.query_params.get("window", "7d"), time.time())
        return self._page("store.html", who=who, page=page, windows=list(STORE_WINDOWS))

    async def static(self, request: Request) -> Response:
        """The stylesheet and the script, from a fixed list (never a path from the URL)."""
        name = request.path_params["name"]
        if name not in self.static_files:
            raise NotFound(f"no static file {name!r}")
        return Response(self.static_files[name], media_type=_STATIC[name],
                        headers={**SECURITY_HEADERS, "cache-control": "max-age=300"})

