"""Sticky disks: named, versioned trees mounted as copy-on-write clones and committed back."""

from .api import (
    CommitResult,
    MountResult,
    commit,
    diff_disk,
    evict,
    list_disks,
    mount,
    remove,
    show,
    unmount,
)

__all__ = ["CommitResult", "MountResult", "commit", "diff_disk", "evict", "list_disks", "mount",
           "remove", "show", "unmount"]
