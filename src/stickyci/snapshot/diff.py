"""Differences between two manifests, as sorted lists of paths."""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Manifest


@dataclass(slots=True)
class Diff:
    """Paths added, removed, with new content, or with only new metadata."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True if the trees are the same."""
        return not (self.added or self.removed or self.modified or self.metadata)

    def as_dict(self) -> dict[str, list[str]]:
        """JSON-friendly form."""
        return {"added": self.added, "removed": self.removed, "modified": self.modified,
                "metadata": self.metadata}


def diff(a: Manifest, b: Manifest) -> Diff:
    """What changed from ``a`` to ``b``."""
    out = Diff()
    for path in sorted(a.entries.keys() | b.entries.keys()):
        old, new = a.entries.get(path), b.entries.get(path)
        if old is None:
            out.added.append(path)
        elif new is None:
            out.removed.append(path)
        elif not old.same_content(new):
            out.modified.append(path)
        elif not old.same_meta(new):
            out.metadata.append(path)
    return out
