"""Snapshots: manifests of directory trees, built into and restored from the store.

A snapshot is named by the :class:`~stickyci.digest.Digest` of its manifest (``snapshot``
values are Digests; their hex is the snapshot id users see); to snapshot a tree is
:func:`snapshot_tree`. The entry helpers (``to_entry``, ``keep_base_meta``, ...) are here for
the mount strategies, which walk an overlay's upper directory themselves.
"""

from .build import (
           ContentFill,
           Scan,
           fill_content,
           load_manifest,
           save_manifest,
           scan_tree,
           snapshot_tree,
)
from .diff import Diff, diff
from .model import DIR, FILE, SYMLINK, Entry, Manifest, validate
from .restore import Content, Metadata, materialize, restore
from .scan import StatKey, is_special, keep_base_meta, skip_special, to_entry

__all__ = ["DIR", "FILE", "SYMLINK", "Content", "ContentFill", "Diff", "Entry", "Manifest",
           "Metadata", "Scan", "StatKey", "diff",
           "fill_content", "is_special", "keep_base_meta", "load_manifest", "materialize",
           "restore", "save_manifest", "scan_tree", "skip_special", "snapshot_tree", "to_entry",
           "validate"]
