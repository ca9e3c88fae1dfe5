"""Sticky disks: named, versioned trees mounted as copy-on-write clones and committed back."""

from .api import (
    COMMIT_MODES,
    CONFLICT_MODES,
    CommitResult,
    DiskDiff,
    DiskSummary,
    EvictResult,
    MountResult,
    RemoveResult,
    UnmountResult,
    commit,
    diff_disk,
    evict,
    list_disks,
    mount,
    remove,
    show,
    unmount,
)
from .basecache import base_path
from .gc import DEFAULT_GRACE, GcReport, gc, root_snapshot
from .holders import release as release_holders
from .mounts import all_mounts
from .policy import DEFAULT_TTL
from .refs import DiskRef, Generation, check_key, read_ref, scan_refs
from .strategies import CHOICES as STRATEGIES

__all__ = ["COMMIT_MODES", "CONFLICT_MODES", "DEFAULT_GRACE", "DEFAULT_TTL", "STRATEGIES",
           "CommitResult", "DiskDiff", "DiskRef", "DiskSummary", "EvictResult", "GcReport",
           "Generation", "MountResult", "RemoveResult", "UnmountResult", "all_mounts",
           "base_path", "check_key", "commit", "diff_disk", "evict", "gc", "list_disks", "mount",
           "read_ref", "release_holders", "remove", "root_snapshot", "scan_refs", "show",
           "unmount"]
