"""``stickyci disk …``: mount, commit, unmount, ls, show, diff, rm, evict, gc.

With ``--json``, a failure also prints a JSON error body on stdout, ``{"error": message,
"kind": error class, "exit_code": N}``, so a caller (the pipeline runner) reads the error's
class instead of matching text; the one-line message still goes to stderr and the exit status
is the error's. Warnings (a ref skipped by ``ls``, a commit whose path is still mounted) go to
stderr as ``stickyci: warning: …`` lines; ``evict``/``gc`` also list skipped refs in their JSON.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import disks
from ..units import format_size as _size
from ..units import parse_duration
from .output import emit, json_option

F = Callable[..., Any]


def store_option(f: F) -> F:
    """``--store URL`` (or ``STICKYCI_STORE``)."""
    return click.option("--store", "store_url", envvar="STICKYCI_STORE", metavar="URL",
                        help="Store URL (default: file:// under the user cache dir).")(f)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
def disk() -> None:
    """Sticky disks: named trees mounted as clones and committed back."""


@disk.command()
@click.argument("key")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--strategy", type=click.Choice(disks.STRATEGIES), default="auto",
              show_default=True)
@click.option("--trust-owners", is_flag=True,
              help="Restore the snapshot's owners and setuid/setgid bits (e.g. for /nix); "
                   "without it the tree belongs to you and has none.")
@store_option
@json_option
def mount(key: str, path: Path, strategy: str, trust_owners: bool, store_url: str | None,
          as_json: bool) -> None:
    """Mount a clone of disk KEY's latest snapshot at PATH."""
    r = disks.mount(key, path, strategy=strategy, store=store_url, trust_owners=trust_owners)

    def text(_: Any) -> str:
        if r.fresh:
            return f"mounted new empty disk {r.key} at {r.path} ({r.strategy}, {r.seconds:.3f}s)"
        cache = ("base cached" if r.base_cached else "content fetched on first read"
                 if r.strategy == "lazy" else "base materialised")
        return (f"mounted {r.key} generation {r.generation} at {r.path} "
                f"({r.strategy}, {cache}, {r.seconds:.3f}s)")

    emit(as_json, r.as_dict(), text)


@disk.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(disks.COMMIT_MODES), default="on-change",
              show_default=True, help="When to store a new generation.")
@click.option("--on-conflict", type=click.Choice(disks.CONFLICT_MODES), default="lww",
              show_default=True, help="lww: win a race and report it; fail: refuse.")
@click.option("--kill-holders", is_flag=True, help="Terminate processes holding PATH.")
@json_option
def commit(path: Path, mode: str, on_conflict: str, kill_holders: bool, as_json: bool) -> None:
    """Store the changes at mount PATH as a new generation, then unmount."""
    r = disks.commit(path, mode=mode, on_conflict=on_conflict, kill_holders=kill_holders)

    def text(_: Any) -> str:
        lines = _killed(r.killed)
        if not r.committed:
            return "\n".join([*lines, f"not committed: {r.reason}; {r.path} unmounted"])
        # New against reused is what deduplication saved; what was written is the new content
        # (compressed, in envelopes) plus the manifest, which lists every file of the tree.
        lines.append(
            f"committed {r.key} generation {r.generation}: +{r.added} -{r.removed} "
            f"~{r.modified} paths; of {_size(r.size)} in {r.files} files, "
            f"{_size(r.new_bytes)} new and {_size(r.reused_bytes)} reused; stored "
            f"{_size(r.stored_bytes - r.manifest_bytes)} content + {_size(r.manifest_bytes)} "
            f"manifest in {r.seconds:.2f}s")
        lines += [f"raced with generation {g['gen']} by {g['committer']} (last write wins)"
                  for g in r.raced_with]
        if r.still_mounted:
            lines.append(f"{r.path} is still mounted: run `stickyci disk unmount {r.path}`")
        return "\n".join(lines)

    emit(as_json, r.as_dict(), text)


@disk.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--kill-holders", is_flag=True, help="Terminate processes holding PATH.")
@json_option
def unmount(path: Path, kill_holders: bool, as_json: bool) -> None:
    """Discard the mount at PATH without committing."""
    r = disks.unmount(path, kill_holders=kill_holders)
    emit(as_json, r.as_dict(), lambda _: "\n".join(
        [*_killed(r.killed), f"unmounted {r.path} (disk {r.key}), changes discarded"]))


def _killed(holders: list[str]) -> list[str]:
    """What ``--kill-holders`` ended, one line per process."""
    return [f"killed {h}" for h in holders]


@disk.command("ls")
@store_option
@json_option
def ls(store_url: str | None, as_json: bool) -> None:
    """List disks."""

    def text(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "no disks"
        # The key column is as wide as the longest key (up to 200 characters), so every row
        # lines up whatever the keys are.
        width = max(len("KEY"), *(len(r["key"]) for r in rows))
        out = [f"{'KEY':{width}}  {'GEN':>4} {'SIZE':>10} {'FILES':>7}  LAST USED"]
        out += [f"{r['key']:{width}}  {r['generation']:>4} {_size(r['size']):>10} "
                f"{r['files']:>7}  {_when(r['last_used'])}" for r in rows]
        return "\n".join(out)

    emit(as_json, [d.as_dict() for d in disks.list_disks(store=store_url)], text)


@disk.command()
@click.argument("key")
@store_option
@json_option
def show(key: str, store_url: str | None, as_json: bool) -> None:
    """Show a disk's generations, sizes and last use, and its lazy mounts on this machine."""

    def text(d: dict[str, Any]) -> str:
        out = [f"disk {d['key']}: created {_when(d['created'])}, last used "
               f"{_when(d['last_used'])}"]
        out += [f"  generation {g['gen']}: {_size(g['size'])} in {g['files']} files, "
                f"stored {_size(g['stored_bytes'])}, committed {_when(g['committed_at'])} by "
                f"{g['committer']}, snapshot {g['snapshot'][:16]}" for g in d["generations"]]
        out += [_lazy_line(m) for m in d["lazy_mounts"]]
        return "\n".join(out)

    emit(as_json, disks.show(key, store=store_url, here=True).as_dict(), text)


def _lazy_line(m: dict[str, Any]) -> str:
    """How far the filler of a lazy mount is, in one line."""
    if "files" not in m:
        return f"  lazy mount at {m['path']}: no filler status yet"
    state = ("complete" if m["done"] else "filling" if m["prefetch"]
             else "filling on demand only")
    return (f"  lazy mount at {m['path']}: {_size(m['on_demand_bytes'])} in "
            f"{m['on_demand_files']} files fetched on demand, {_size(m['prefetched_bytes'])} in "
            f"{m['prefetched_files']} files prefetched, of {_size(m['bytes'])} in {m['files']} "
            f"files; {state}" + (f", {m['errors']} failed fills" if m["errors"] else ""))


@disk.command()
@click.argument("key")
@click.argument("gen_a", type=int, required=False)
@click.argument("gen_b", type=int, required=False)
@store_option
@json_option
def diff(key: str, gen_a: int | None, gen_b: int | None, store_url: str | None,
         as_json: bool) -> None:
    """Show what changed between two generations (default: the last two)."""

    def text(d: dict[str, Any]) -> str:
        out = [f"disk {d['key']}: generation {d['from']} → {d['to']}"]
        for sign, name in (("+", "added"), ("-", "removed"), ("M", "modified"),
                           ("m", "metadata")):
            out += [f"{sign} {p}" for p in d[name]]
        return "\n".join(out)

    emit(as_json, disks.diff_disk(key, gen_a, gen_b, store=store_url).as_dict(), text)


@disk.command()
@click.argument("key")
@store_option
@json_option
def rm(key: str, store_url: str | None, as_json: bool) -> None:
    """Remove a disk (its data goes at the next gc)."""
    r = disks.remove(key, store=store_url)
    emit(as_json, r.as_dict(), lambda _: f"removed disk {r.key}")


@disk.command()
@click.option("--unused-for", default=f"{disks.DEFAULT_TTL // 86400}d", show_default=True,
              help="Evict disks not mounted or committed for this long (e.g. 12h, 7d).")
@click.option("--dry-run", is_flag=True, help="Only list what would be evicted.")
@store_option
@json_option
def evict(unused_for: str, dry_run: bool, store_url: str | None, as_json: bool) -> None:
    """Remove disks unused for a while."""
    r = disks.evict(parse_duration(unused_for), dry_run=dry_run, store=store_url)
    verb = "would evict" if dry_run else "evicted"
    emit(as_json, r.as_dict(), lambda _: f"{verb} {len(r.evicted)} disk(s)"
         + "".join(f"\n  {k}" for k in r.evicted))


@disk.command()
@click.option("--grace", default="1h", show_default=True,
              help="Leave objects younger than this (commits in flight).")
@click.option("--dry-run", is_flag=True, help="Only report what would be freed.")
@store_option
@json_option
def gc(grace: str, dry_run: bool, store_url: str | None, as_json: bool) -> None:
    """Delete objects no disk references."""
    r = disks.gc(store=store_url, grace=parse_duration(grace), dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    emit(as_json, r.as_dict(), lambda d: (
        f"{verb} {_size(d['bytes_freed'])}: {d['packs_deleted']} packs deleted, "
        f"{d['packs_repacked']} repacked, {d['orphans_deleted']} orphans; "
        f"{d['live_objects']} live objects; {d['refs_rehinted']} disks' pack hints updated"))

