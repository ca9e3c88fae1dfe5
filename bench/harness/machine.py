"""What the figures were measured on: the machine, the software, and the stickyci revision."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

from .proc import first_line


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo)."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    return "unknown CPU"


def machine() -> dict[str, str]:
    """The machine and the tools the disk benchmarks compare with."""
    mem = 0
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
    vm = []
    balloon = Path("/sys/bus/virtio/drivers/virtio_balloon")
    if balloon.is_dir() and any(p.name.startswith("virtio") for p in balloon.iterdir()):
        vm.append("virtio-balloon")
    with contextlib.suppress(OSError, ValueError):
        if int(Path("/sys/kernel/mm/damon/admin/kdamonds/nr_kdamonds").read_text()) > 0:
            vm.append("DAMON")
    cpu = cpu_model()
    return {"cpu": "unknown" if cpu == "unknown CPU" else cpu, "nproc": str(os.cpu_count()),
            "ram": f"{mem / 2**30:.1f} GiB", "vm": ", ".join(vm),
            "kernel": platform.release(), "python": platform.python_version(),
            "restic": first_line(["restic", "version"]),
            "zstd": first_line(["zstd", "--version"]).strip("* ").replace(", by Yann Collet",
                                                                          ""),
            "tar": first_line(["tar", "--version"])}


def versions(*packages: str) -> str:
    """``name version`` of installed Python packages, comma-separated."""
    return ", ".join(f"{m} {version(m)}" for m in packages)


def _src() -> Path:
    import stickyci

    return Path(stickyci.__file__).resolve().parent


def src_fingerprint() -> str:
    """A digest of stickyci's source files, to notice src/ changing during a run."""
    h = hashlib.sha256()
    for f in sorted(_src().rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def stickyci_revision() -> str:
    """The git revision of the stickyci source the run imported, and whether src/ was dirty."""
    src = _src()
    rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "."],
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"{rev}{' + uncommitted changes in src/' if dirty else ''}"
