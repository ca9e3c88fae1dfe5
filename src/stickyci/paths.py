"""Where stickyci keeps its local state on this machine (every layer asks here)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """stickyci's directory under the user's cache directory (``STICKYCI_CACHE_DIR`` wins)."""
    explicit = os.environ.get("STICKYCI_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stickyci"
