"""Questions the Dask client asks every worker through ``Client.run`` before and while it places
jobs: can this worker run stickyci jobs, and which snapshots does its base cache hold."""

from __future__ import annotations

import os
from typing import Any

from ... import __version__
from ...digest import Digest
from ...disks import base_path


def probe(pipeline_dir: str) -> dict[str, Any]:
    """Checked before a run: this worker's stickyci version and the pipeline directory."""
    return {"version": __version__, "pipeline_dir": os.path.isdir(pipeline_dir)}


def held(snapshots: list[str]) -> list[str]:
    """Which of ``snapshots`` this worker's base cache holds: a mount of them is instant."""
    return [s for s in snapshots if base_path(Digest.parse(s)).is_dir()]
