"""The Nix example (``examples/nix``) cold, warm, and evicted with the binary cache as fallback.

    python3 bench/nix.py [--runs 3] [--services services.json] [--kernels 6]
                         [--write docs/benchmarks.md]

One ``stickyci serve`` is the Nix binary cache. A warm-up run fills the cache and commits the
``/nix`` disk; then each round runs, through ``stickyci run``:

- **cold**: ``--cold`` (every disk starts empty) against a cache of its own, empty: the closure
  is compiled from source;
- **evicted**: the ``/nix`` disk removed (``stickyci disk rm``), the cache full: the closure is
  substituted from ``stickyci serve``, then committed to the disk again;
- **warm**: the ``/nix`` disk as the evicted run committed it: nothing is built or fetched.

The issue's targets: warm <= 25% of cold, evicted (fallback) <= 50% of cold. Runs as root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.proc import REPO, log, stickyci, tests_helpers
from harness.report import Target, target_table, write_section

KEY = "nix"
PIPELINE = REPO / "examples" / "nix" / "pipeline.yml"
CACHE = "nix-bench"
DISK = "nix-example-nix"
KINDS = ("cold", "evicted", "warm")


def run(env: dict[str, str], server_url: str, key: str, cache: str, args: argparse.Namespace,
        *extra: str) -> dict[str, Any]:
    """One run of the example; its record, with what Nix did in warm-deps."""
    record: dict[str, Any] = json.loads(stickyci(
        "run", str(PIPELINE), "--json", "--sha", "bench", "--set", f"services={args.services}",
        "--set", f"kernels={args.kernels}", "--set", f"cache={server_url}/nix/{cache}",
        "--set", f"cache_key={key}", *extra, env=env).stdout)
    if record["state"] != "success":
        raise SystemExit(f"the example failed: {[(j['id'], j['reason']) for j in record['jobs']]}")
    deps = next(j for j in record["jobs"] if j["id"] == "warm-deps")
    text = "".join((Path(record["run_dir"]) / s["log"]).read_text()
                   for s in deps["steps"] if s["log"])
    m = re.search(r"^derivations built: (\d+), paths fetched: (\d+)$", text, re.M)
    record["nix"] = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    record["warm_deps"] = deps["finished_at"] - deps["started_at"]
    return record


def bench(args: argparse.Namespace, work: Path) -> dict[str, list[dict[str, Any]]]:
    """Every round's records, by kind."""
    tests_helpers()
    from server import start_server

    env = {**os.environ, "STICKYCI_CACHE_DIR": str(work / "cache"),
           "STICKYCI_STORE": f"file://{work / 'store'}"}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    with start_server(work / "server") as server:
        env["STICKYCI_TOKEN"] = server.token("--write", "nix-*")

        def key(cache: str) -> str:
            stickyci("nix", "key", "generate", "--state-dir", str(server.state), cache, env=env)
            return stickyci("nix", "key", "show", "--state-dir", str(server.state), cache,
                            env=env).stdout.strip()

        main_key = key(CACHE)
        log("warm-up: fills the cache and commits the /nix disk")
        run(env, server.url, main_key, CACHE, args)
        for i in range(args.runs):
            empty = f"{CACHE}-cold-{i}"
            log(f"round {i + 1}/{args.runs}: cold")
            results["cold"].append(run(env, server.url, key(empty), empty, args, "--cold"))
            log(f"round {i + 1}/{args.runs}: evicted, the cache as fallback")
            stickyci("disk", "rm", DISK, env=env)
            results["evicted"].append(run(env, server.url, main_key, CACHE, args))
            log(f"round {i + 1}/{args.runs}: warm")
            results["warm"].append(run(env, server.url, main_key, CACHE, args))
    return results


def markdown(results: dict[str, list[dict[str, Any]]], command: str, runs: int) -> str:
    """The results as a Markdown section."""
    med = {k: statistics.median(r["seconds"] for r in results[k]) for k in KINDS}
    deps = {k: statistics.median(r["warm_deps"] for r in results[k]) for k in KINDS}
    what = {"cold": "--cold, an empty cache: compiled", "evicted":
            "the disk removed, the cache full: substituted", "warm": "the /nix disk"}
    lines = ["## The Nix example: cold, warm, evicted with the binary cache", "",
             f"- **Command:** `{command}`",
             f"- **Machine:** {os.cpu_count()} CPUs, Linux {os.uname().release}; "
             f"**date** {time.strftime('%Y-%m-%d %H:%M')} (UTC); medians of {runs} rounds.", "",
             "| run | how | total s | warm-deps s | warm-deps: built, fetched | / cold |",
             "|---|---|---:|---:|---|---:|"]
    for k in KINDS:
        built, fetched = results[k][-1]["nix"]
        lines.append(f"| {k} | {what[k]} | {med[k]:.2f} | {deps[k]:.2f} | {built}, {fetched} "
                     f"| {med[k] / med['cold']:.0%} |")
    lines += ["", target_table([
        Target("warm total / cold total", med["warm"] / med["cold"] * 100, 25, "%"),
        Target("evicted (fallback) total / cold total", med["evicted"] / med["cold"] * 100,
               50, "%")])]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the rounds on a private store, cache dir and server."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--services", default="services.json")
    ap.add_argument("--kernels", type=int, default=6)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/nix.py runs as root: the /nix disk keeps root-owned files")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        results = bench(args, Path(tmp))
    command = ("python3 bench/nix.py " + " ".join(sys.argv[1:])).strip()
    section = markdown(results, command, args.runs)
    print(section)
    if args.write:
        write_section(args.write, KEY, section)


if __name__ == "__main__":
    main()
