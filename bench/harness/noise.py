"""Noise control: the CPU other processes use during a measurement, waiting for a quiet machine,
and measuring again when it was not quiet.

Every benchmark here may run on a shared machine (tests next to it); these put a number on that.
All CPU figures come from the same counters: /proc/stat for the machine, /proc/PID/stat for a
process tree, ``getrusage`` for this process and its reaped children.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable, Sequence

from .proc import log, run, tree_ticks

TICK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def _cpu_fields() -> list[int]:
    """The machine's CPU clock ticks by state (/proc/stat: user, nice, system, idle, iowait,
    irq, softirq, steal, guest, guest_nice)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def machine_ticks(*, interrupts: bool = True) -> int:
    """Busy clock ticks of the whole machine (steal counts as busy); without ``interrupts``,
    the time in hard and soft interrupts (where the loopback network stack of client and
    server runs, charged to no process) is left out."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = _cpu_fields()[:8]
    return user + nice + system + steal + (irq + softirq if interrupts else 0)


def cpu_ticks() -> tuple[int, int]:
    """Busy and total CPU ticks of the whole machine so far: a share of the machine over a
    stretch of time is the ratio of their differences."""
    fields = _cpu_fields()
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def own_cpu(*, children: bool = True, me: bool = True) -> float:
    """CPU seconds of this process and/or its reaped children so far."""
    total = 0.0
    for who, wanted in ((resource.RUSAGE_SELF, me), (resource.RUSAGE_CHILDREN, children)):
        if wanted:
            ru = resource.getrusage(who)
            total += ru.ru_utime + ru.ru_stime
    return total


def wait_quiet(limit: float, below: float = 0.10) -> bool:
    """Wait (up to ``limit`` s) until other processes use less than ``below`` of the CPUs;
    the caller is idle meanwhile, so all busy time is theirs. Returns whether it had to wait."""
    deadline = time.perf_counter() + limit
    waited = False
    while time.perf_counter() < deadline:
        busy = machine_ticks()
        time.sleep(0.5)
        if (machine_ticks() - busy) / TICK / (0.5 * NCPU) < below:
            break
        if not waited:
            log("  waiting for other processes to quiet down before measuring ...")
            waited = True
    return waited


class CpuWatch:
    """CPU time that processes other than this benchmark's used during a measurement.

    Kernel threads (write-back, I/O completion) and hypervisor steal count as "other" too.
    """

    def __init__(self) -> None:
        self._busy = self._own = self._start = 0.0
        self._share = 0.0
        self.quiet_wait = 0.0
        # Servers the benchmark started and has not reaped (so getrusage does not count them):
        # their CPU, and their children's, is the benchmark's, not other processes'.
        self.ours: Sequence[int] = ()

    def begin(self) -> float:
        """Start a measurement (after waiting for a quiet machine); returns
        ``time.perf_counter()``."""
        wait_quiet(self.quiet_wait)
        self._busy, self._own = machine_ticks() / TICK, self._own_cpu()
        self._start = time.perf_counter()
        return self._start

    def end(self) -> float:
        """End a measurement; returns ``time.perf_counter()``."""
        now = time.perf_counter()
        wall = now - self._start
        other = (machine_ticks() / TICK - self._busy) - (self._own_cpu() - self._own)
        # /proc/stat counts in clock ticks (10 ms): too coarse to say anything about shorter
        # measurements, which are then taken as undisturbed.
        self._share = max(0.0, other) / (wall * NCPU) if wall >= 0.2 else 0.0
        return now

    def _own_cpu(self) -> float:
        return own_cpu() + (tree_ticks(self.ours) / TICK if self.ours else 0.0)

    @property
    def other_share(self) -> float:
        """Other processes' CPU during the last measurement, as a share of all CPUs."""
        return self._share


WATCH = CpuWatch()


def timed(cmd: str | Sequence[str], *, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one command, process start-up included (that is what a job pays)."""
    start = WATCH.begin()
    run(cmd, env=env)
    return WATCH.end() - start


def attempt(label: str, measure: Callable[[], object], *, other: Callable[[], float],
            drop_last: Callable[[], None], max_other: float, tries: int = 3,
            errors: tuple[type[Exception], ...] = (), failures: list[str] | None = None) -> int:
    """Run one measurement; redo it (at most ``tries - 1`` more times, ``drop_last``
    forgetting the previous figures) when ``other()``, the share of the CPUs other processes
    used during it, was over ``max_other``, so a busy neighbour does not set the median.
    A measurement raising one of ``errors`` is logged and noted in ``failures`` instead of
    ending the benchmark: one tool failing must not lose the others' figures. Returns how many
    times it measured again."""
    for i in range(tries):
        try:
            measure()
        except errors as exc:
            msg = (str(exc).strip().splitlines() or [repr(exc)])[-1][:300]
            log(f"  FAILED: {label}: {msg}")
            if failures is not None:
                failures.append(f"{label}: {msg}")
            return i
        share = other()
        if share <= max_other or i == tries - 1:
            return i
        log(f"  other processes used {share:.0%} of the CPUs; measuring again")
        drop_last()
    return tries - 1


def add_noise_options(p: argparse.ArgumentParser, *, quiet_wait: float = 60,
                      max_other_cpu: float = 0.25) -> None:
    """``--max-other-cpu`` and ``--quiet-wait``: how a benchmark copes with a shared machine."""
    p.add_argument("--max-other-cpu", type=float, default=max_other_cpu, metavar="SHARE",
                   help="redo a measurement (at most twice) when processes other than the "
                   "benchmark used more than this share of the CPUs during it (default "
                   f"{max_other_cpu:g})")
    p.add_argument("--quiet-wait", type=float, default=quiet_wait, metavar="S",
                   help="before each measurement, wait up to S seconds for other processes "
                   f"to stop using the CPUs (default {quiet_wait:g}; 0: never wait)")
