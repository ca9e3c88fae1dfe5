"""stickyci: sticky disks on a content-addressed store, for monorepo CI that starts warm."""

__version__ = "0.1.0"
