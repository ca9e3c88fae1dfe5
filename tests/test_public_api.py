"""The faces of the packages below the pipeline: what each exports is locked here.

Layers above import a package only through its ``__init__`` (import-linter enforces that in
``.ci/run``), so ``__all__`` is the package's public API. Changing it is a decision: this test
makes it a visible one, as httpx's test of its ``__all__`` does.
"""

from __future__ import annotations

import importlib
import types

import pytest

PUBLIC = {
    "stickyci.store": [
        "Backend", "IndexEntry", "LocalBackend", "Location", "ObjectStore", "Stat", "as_backend",
        "check_name", "decode_index", "default_store_url", "encode_index", "open_backend",
        "read_at", "repack", "verify_index",
    ],
    "stickyci.snapshot": [
        "Content", "ContentFill", "DIR", "Diff", "Entry", "FILE", "Manifest", "Metadata",
        "SYMLINK", "Scan",
        "StatKey", "diff",
        "fill_content", "is_special", "keep_base_meta", "load_manifest", "materialize",
        "restore", "save_manifest", "scan_tree", "skip_special", "snapshot_tree", "to_entry",
        "validate",
    ],
    "stickyci.disks": [
        "COMMIT_MODES", "CONFLICT_MODES", "CommitResult", "DEFAULT_GRACE", "DEFAULT_TTL",
        "DiskDiff", "DiskRef", "DiskSummary", "EvictResult", "GcReport", "Generation",
        "MountResult", "RemoveResult", "STRATEGIES", "UnmountResult", "all_mounts", "base_path",
        "check_key", "commit", "diff_disk", "evict", "gc", "list_disks", "mount", "read_ref",
        "release_holders", "remove", "root_snapshot", "scan_refs", "show", "unmount",
    ],
    "stickyci.runs": [
        "AttemptRecord", "CANCELLED", "DiskRecord", "FAILURE", "FINISHED", "History",
        "JOB_COLUMNS", "JobRecord", "LOST", "LogTail", "PENDING", "QUEUED", "RUNNING",
        "Reporter", "Row", "RunRecord", "RunReport", "SKIPPED", "SUCCESS", "StepRecord",
        "TIMED_OUT", "chart", "compare", "duration", "failing_step", "failures", "job_rows",
        "printable", "push_runs", "race_warnings", "record_from_dict", "render_markdown",
        "runs_url", "table", "write_reports",
    ],
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_all_is_the_locked_public_api(name: str) -> None:
    package = importlib.import_module(name)
    assert sorted(package.__all__) == sorted(PUBLIC[name])
    assert len(set(package.__all__)) == len(package.__all__), "a name is listed twice"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_exported_name_exists(name: str) -> None:
    package = importlib.import_module(name)
    missing = [n for n in package.__all__ if not hasattr(package, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_what_the_face_imports_from_its_package_is_exported(name: str) -> None:
    """A class or function brought into the face from the package's own modules is public:
    one imported for layers above but left out of ``__all__`` would be used unlocked."""
    package = importlib.import_module(name)
    unlisted = sorted(
        attr for attr, value in vars(package).items()
        if not attr.startswith("_") and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", "").startswith(f"{name}.")
        and attr not in package.__all__)
    assert not unlisted, f"{name} imports {unlisted} from its modules without exporting them"
