"""Snapshots: manifests of directory trees, built into and restored from the store."""

from .build import Scan, fill_content, load_manifest, save_manifest, scan_tree, snapshot_tree
from .diff import Diff, diff
from .model import Entry, Manifest
from .restore import materialize, restore

__all__ = ["Diff", "Entry", "Manifest", "Scan", "diff", "fill_content", "load_manifest",
           "materialize", "restore", "save_manifest", "scan_tree", "snapshot_tree"]
