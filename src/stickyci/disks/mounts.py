"""The record of a live mount, kept on this machine beside its overlay upper and work dirs.

A record is local state, but it names paths the next commit, unmount and eviction act on, so
it is parsed as strictly as a ref: a damaged or hand-edited record is refused, never trusted.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..digest import Digest
from ..errors import IntegrityError, NotAMount, StickyError
from ..fsutil import remove_later
from ..paths import cache_home
from .refs import check_key

log = logging.getLogger("stickyci")
_FIELDS = frozenset({"key", "path", "store", "strategy", "base", "base_gen", "mounted_at",
                     "trust_owners"})


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
    base: Digest | None  # None for a fresh disk
    base_gen: int
    mounted_at: float
    trust_owners: bool  # restored with the manifest's owners and special bits

    @property
    def dir(self) -> Path:
        """This mount's private directory."""
        return state_dir(Path(self.path))

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the base as bare hex, "" for a fresh disk)."""
        return {"key": self.key, "path": self.path, "store": self.store,
                "strategy": self.strategy, "base": self.base.hex if self.base else "",
                "base_gen": self.base_gen, "mounted_at": self.mounted_at,
                "trust_owners": self.trust_owners}

    def save(self) -> None:
        """Write the record atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.as_dict()))
        os.replace(tmp, self.dir / "state.json")

    def forget(self) -> None:
        """Remove the record and everything in its directory (the upper dir, for overlay)."""
        remove_later(self.dir, mounts_root() / ".trash")


def parse(data: bytes, where: Path) -> MountState:
    """A mount record from its JSON form; ``IntegrityError`` names the record at fault."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.keys() != _FIELDS:
            raise ValueError(f"its fields are not {', '.join(sorted(_FIELDS))}")
        texts = [doc[f] for f in ("key", "path", "store", "strategy", "base")]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("a text field is not a string")
        base_gen, mounted_at = doc["base_gen"], doc["mounted_at"]
        if type(base_gen) is not int or base_gen < 0:
            raise ValueError("base_gen is not a non-negative integer")
        if type(mounted_at) not in (int, float) or not math.isfinite(mounted_at):
            raise ValueError("mounted_at is not a timestamp")
        if type(doc["trust_owners"]) is not bool:
            raise ValueError("trust_owners is not true or false")
        if not os.path.isabs(doc["path"]):
            raise ValueError("path is not absolute")
        base = Digest.parse(doc["base"]) if doc["base"] else None
        return MountState(check_key(doc["key"]), doc["path"], doc["store"], doc["strategy"],
                          base, base_gen, float(mounted_at), doc["trust_owners"])
    except (ValueError, StickyError) as exc:
        raise IntegrityError(f"the mount record {where} is damaged ({exc}); unmount the path "
                             "with umount and delete the record") from None


def load(path: Path) -> MountState:
    """The record of the mount at ``path``; raise ``NotAMount`` if there is none."""
    record = state_dir(path) / "state.json"
    try:
        data = record.read_bytes()
    except FileNotFoundError:
        raise NotAMount(f"{path} is not a stickyci mount; mount it first with "
                        "`stickyci disk mount KEY PATH`") from None
    state = parse(data, record)
    if state.path != str(path):
        raise IntegrityError(f"the mount record {record} names {state.path!r}, not {path}; "
                             "delete the record")
    return state


def all_mounts() -> list[MountState]:
    """Every mount recorded on this machine; a damaged record is skipped with a warning."""
    out = []
    root = mounts_root()
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("."):
                continue
            try:
                out.append(parse((d / "state.json").read_bytes(), d / "state.json"))
            except FileNotFoundError:
                continue
            except IntegrityError as exc:
                log.warning("%s", exc)
    return out
