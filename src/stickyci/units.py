"""Durations and sizes as people write them (``7d``, ``20G``) and as reports print them."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str, *, bare_seconds: bool = False) -> float:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` → seconds; a bare number only if allowed."""
    unit = "[smhdw]?" if bare_seconds else "[smhdw]"
    m = re.fullmatch(rf"\s*(\d+(?:\.\d+)?)\s*({unit})\s*", text)
    if not m:
        raise UsageError(f"invalid duration {text!r}: use a number and one of s, m, h, d, w "
                         "(e.g. 7d)")
    return float(m.group(1)) * _UNITS.get(m.group(2), 1)


def option_duration(option: str, text: str, at_least: float = 0.0) -> float:
    """``--OPTION TEXT`` as seconds, refused unless over zero and at least ``at_least``."""
    try:
        seconds = parse_duration(text)
    except UsageError:
        raise UsageError(f"--{option} {text!r}: use a number and one of s, m, h, d, w "
                         "(e.g. 1h)") from None
    if seconds <= 0 or seconds < at_least:
        least = f"at least {at_least:g}s" if at_least else "a positive duration"
        raise UsageError(f"--{option} {text!r}: must be {least} (e.g. 1h)")
    return seconds


def parse_size(text: str) -> int:
    """``500M``, ``20G``, ``1024`` → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise UsageError(f"invalid size {text!r}: use a number with K, M, G or T (e.g. 20G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_size(n: int) -> str:
    """``512 B``, ``2.0 KiB``, ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
