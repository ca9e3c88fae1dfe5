"""The record of a live mount, kept on this machine beside its overlay upper and work dirs."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..digest import Digest
from ..errors import NotAMount
from ..fsutil import remove_later
from ..store import cache_home


def mounts_root() -> Path:
    """Where mount records live."""
    return cache_home() / "mounts"


def state_dir(path: Path) -> Path:
    """The private directory of the mount at ``path``."""
    return mounts_root() / Digest.of(str(path).encode()).hex[:24]


@dataclass(slots=True)
class MountState:
    """What a commit needs to know about a mount."""

    key: str
    path: str
    store: str
    strategy: str
    base: str  # snapshot hex, "" for a fresh disk
    base_gen: int
    mounted_at: float

    @property
    def dir(self) -> Path:
        """This mount's private directory."""
        return state_dir(Path(self.path))

    def save(self) -> None:
        """Write the record atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, self.dir / "state.json")

    def forget(self) -> None:
        """Remove the record and everything in its directory (the upper dir, for overlay)."""
        remove_later(self.dir, mounts_root() / ".trash")


def load(path: Path) -> MountState:
    """The record of the mount at ``path``; raise ``NotAMount`` if there is none."""
    try:
        doc = json.loads((state_dir(path) / "state.json").read_text())
    except FileNotFoundError:
        raise NotAMount(f"{path} is not a stickyci mount; mount it first with "
                        "`stickyci disk mount KEY PATH`") from None
    return MountState(**doc)


def all_mounts() -> list[MountState]:
    """Every mount recorded on this machine."""
    out = []
    root = mounts_root()
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("."):
                continue
            try:
                out.append(MountState(**json.loads((d / "state.json").read_text())))
            except (FileNotFoundError, ValueError, TypeError):
                continue
    return out
