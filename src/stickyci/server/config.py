"""How ``stickyci serve`` was started: a value the CLI builds without importing the server
(``serve --workers`` must set up the shared metrics before anything imports them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..disks import DEFAULT_GRACE


@dataclass(frozen=True)
class ServerConfig:
    """How ``stickyci serve`` was started."""

    store_url: str
    state_dir: Path
    max_size: int | None = None
    max_body: int = 2 << 30
    anonymous_read: bool = False
    evict_after: float | None = None
    evict_every: float = 3600.0
    gc_grace: float = DEFAULT_GRACE
