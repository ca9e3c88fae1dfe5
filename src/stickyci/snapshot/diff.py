"""Differences between two manifests, as sorted lists of paths."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .model import Manifest, any_linked


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


def diff(a: Manifest, b: Manifest, candidates: Iterable[str] | None = None) -> Diff:
    """What changed from ``a`` to ``b``; only ``candidates`` are compared when given.

    A strategy that knows which paths it touched (overlay: the upper dir) passes them, so an
    incremental commit of a large tree costs in proportion to its changes.
    """
    out = Diff()
    paths = a.entries.keys() | b.entries.keys() if candidates is None else set(candidates)
    # Every path compared: the parsed entries; only some: lookups, which a lazily read
    # manifest answers without parsing the rest.
    get_a, get_b = (a.entries.get, b.entries.get) if candidates is None else (a.get, b.get)
    links_a = links_b = {}
    # Only a hardlinked path in both trees can have a new group; finding the groups walks both
    # trees whole. (A new disk's first commit: no path is in both.)
    if candidates is None or any_linked([p for p in paths if get_a(p) is not None], a, b):
        links_a, links_b = _link_leaders(a), _link_leaders(b)
    for path in sorted(paths):
        old, new = get_a(path), get_b(path)
        if old is None and new is None:
            continue
        if old is None:
            out.added.append(path)
        elif new is None:
            out.removed.append(path)
        elif not old.same_content(new):
            out.modified.append(path)
        elif not old.same_meta(new) or links_a.get(path) != links_b.get(path):
            out.metadata.append(path)
    return out


def _link_leaders(m: Manifest) -> dict[str, str]:
    """Each hardlinked path mapped to the first path of its group.

    Group numbers differ between manifests (they are renumbered on save), so groups are
    compared by membership instead.
    """
    groups: dict[int, list[str]] = {}
    for e in m.entries.values():
        if e.link:
            groups.setdefault(e.link, []).append(e.path)
    return {p: min(members) for members in groups.values() for p in members}
