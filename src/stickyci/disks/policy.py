"""Eviction policy as pure functions: given what exists and when it was used, what goes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import UsageError

DEFAULT_TTL = 7 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise UsageError(f"invalid duration {text!r}: use a number and one of s, m, h, d, w "
                         "(e.g. 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """``500M``, ``20G``, ``1024`` → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise UsageError(f"invalid size {text!r}: use a number with K, M, G or T (e.g. 20G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


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
