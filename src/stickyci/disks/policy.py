"""The two removal rules as pure functions: given what exists and when it was used, what goes.

``unused_for`` is the TTL of disk eviction; ``over_budget`` is the least-recently-used
budget the base cache is trimmed to (the runner's tier and the server's Bazel cache trim the
same way with their own bookkeeping).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_TTL = 7 * 86400


@dataclass(frozen=True, slots=True)
class Used:
    """Something evictable: its name, size and when it was last used."""

    name: str
    size: int
    last_used: float


def unused_for(items: Iterable[Used], now: float, ttl: float) -> list[str]:
    """Names not used in the last ``ttl`` seconds, oldest first."""
    stale = [u for u in items if now - u.last_used >= ttl]
    return [u.name for u in sorted(stale, key=lambda u: (u.last_used, u.name))]


def over_budget(items: Iterable[Used], limit: int, keep: set[str]) -> list[str]:
    """Least recently used names to drop until the total fits ``limit``; ``keep`` never goes."""
    items = list(items)
    total = sum(u.size for u in items)
    out = []
    for u in sorted(items, key=lambda u: (u.last_used, u.name)):
        if total <= limit:
            break
        if u.name in keep:
            continue
        out.append(u.name)
        total -= u.size
    return out
