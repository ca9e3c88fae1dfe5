"""The shared benchmark harness: every script in bench/ measures, reports and cleans up with it.

Its modules, imported by name (``from harness.fs import remove``): ``proc`` runs commands and
starts, waits for and stops servers; ``fs`` removes trees, finds leftover mounts and drops the
page cache; ``noise`` puts a number on the CPU other processes use meanwhile, waits for a quiet
machine and measures again when it was not quiet; ``machine`` says what the figures were
measured on; ``report`` formats figures and writes a benchmark's section of
docs/benchmarks.md; ``datasets`` builds the data sets (a generated build tree, a real tree,
content-addressed blobs); ``cli`` holds the options and checks every benchmark shares;
``treebench`` the base of the benchmarks on a tree of files. A benchmark runs as
``python3 bench/NAME.py``, so bench/ is on ``sys.path`` and ``harness`` imports as a top-level
package; tests/ (its SeaweedFS and ``stickyci serve`` helpers) is added by
``proc.tests_helpers`` alone.
"""
