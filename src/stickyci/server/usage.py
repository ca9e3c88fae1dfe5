"""Cache use per cache, as it happens: lookups (hits, misses) and bytes served, by the Bazel
instance, Nix cache or GitHub Actions cache they went to.

The Prometheus counters (``metrics.py``) count lookups by kind only, so a scrape stays small;
the dashboard needs them per instance too, to show each token the caches its patterns cover.
The access middleware hands every finished request here: the kind and outcome the handler
reported through ``Metrics.hit``, the instance or cache from the matched route. What is counted
is taken whole every minute by the history sampler (``history.py``).

Instance and cache names come from requests, so anyone who may read can make up new ones: a
minute holds at most ``MAX_NAMES`` of them, and the rest are counted under ``OVERFLOW``, which
only a token that sees everything is shown.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KINDS = {"ac": "bazel", "cas": "bazel", "narinfo": "nix", "nar": "nix", "gha": "gha"}
"""Lookup kind (as ``Metrics.hit`` names it) → the family of caches it belongs to."""
FAMILIES = ("bazel", "nix", "gha")
MAX_NAMES = 100
"""Most caches counted apart in one minute; the rest go to ``OVERFLOW``."""
OVERFLOW = "(other)"
"""Not a valid instance or cache name, so it is never confused with one."""
DEFAULT_INSTANCE = "default"


@dataclass(slots=True)
class Use:
    """Lookups and bytes served of one cache in one stretch of time."""

    hits: int = 0
    misses: int = 0
    bytes_out: int = 0

    def add(self, other: Use) -> None:
        """Count ``other`` in too."""
        self.hits += other.hits
        self.misses += other.misses
        self.bytes_out += other.bytes_out


Tally = dict[tuple[str, str], Use]
"""(family, cache name) → its use."""


def cache_of(scope: Mapping[str, Any], kind: str | None) -> tuple[str, str] | None:
    """The (family, cache name) a finished request used, or None if it was no cache use:
    a lookup the handler reported as ``kind``, or a GitHub Actions archive download."""
    params = scope.get("path_params") or {}
    if kind is None:
        # An archive download follows a lookup that was counted; its bytes are what it served.
        return ("gha", "") if str(scope.get("path", "")).startswith("/gha/download/") else None
    family = KINDS.get(kind)
    if family == "bazel":
        return family, str(params.get("instance", DEFAULT_INSTANCE))
    if family == "nix":
        return family, str(params.get("cache", ""))
    if family == "gha":
        return family, ""
    return None


class CacheUse:
    """What each cache served since the last ``take``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now: Tally = {}

    def record(self, scope: Mapping[str, Any], kind: str | None, found: bool | None,
               status: int, bytes_out: int) -> None:
        """Count one finished request (see ``cache_of``)."""
        where = cache_of(scope, kind)
        if where is None:
            return
        with self._lock:
            use = self._now.get(where)
            if use is None:
                if where[1] and len(self._now) >= MAX_NAMES:  # the one GHA cache is no name
                    where = (where[0], OVERFLOW)
                use = self._now.setdefault(where, Use())
            if found is None:  # a download: bytes only, when it was served
                if status in (200, 206):
                    use.bytes_out += bytes_out
            elif found:
                use.hits += 1
                # A lookup answers with the entry (Bazel, Nix); the GitHub Actions lookup
                # answers with a URL, whose download is counted on its own.
                use.bytes_out += bytes_out if where[0] != "gha" else 0
            else:
                use.misses += 1

    def take(self) -> Tally:
        """Everything counted so far, which is forgotten here."""
        with self._lock:
            got, self._now = self._now, {}
        return got

    def peek(self) -> Tally:
        """Everything counted so far, kept."""
        with self._lock:
            return {k: Use(u.hits, u.misses, u.bytes_out) for k, u in self._now.items()}
