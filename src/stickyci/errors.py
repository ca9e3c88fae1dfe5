"""One rooted exception tree; every message is written for the user, on one line.

    StickyError                    exit 1   anything stickyci reports
    ├── UsageError                 exit 2   bad input: key, path, option, URL
    │   ├── InvalidKey
    │   ├── NotAMount
    │   └── TooLarge                         a request body over the server's limit
    ├── NotFound                   exit 3   a disk, generation or object that does not exist
    ├── IntegrityError             exit 4   stored bytes that do not match their name
    ├── ConflictError              exit 5   another writer won a race we were told not to lose
    ├── BusyError                  exit 6   processes hold the path; the message names them
    ├── StorageFull                exit 7   the store ran out of space; nothing was published
    ├── BackendError               exit 8   the store failed for another reason
    │   └── UnsafePath             exit 9   a manifest path that would escape its root
    └── AuthError                  exit 10  a server refused the token: missing, bad or expired
        └── Forbidden                         a valid token whose scopes do not cover the request

The CLI maps ``exit_code`` to the process exit status and prints ``str(error)``; it never
prints a traceback for a ``StickyError``.
"""

from __future__ import annotations


class StickyError(Exception):
    """Base of every error stickyci raises on purpose."""

    exit_code = 1


class UsageError(StickyError):
    """The user asked for something malformed; the message says what to change."""

    exit_code = 2


class InvalidKey(UsageError):
    """A disk key with characters outside the allowed set."""


class NotAMount(UsageError):
    """A path that stickyci did not mount."""


class TooLarge(UsageError):
    """A request body larger than the server accepts."""


class NotFound(StickyError):
    """A disk, generation or object that does not exist."""

    exit_code = 3


class IntegrityError(StickyError):
    """Stored bytes whose digest or envelope does not match: corruption, never restored."""

    exit_code = 4


class ConflictError(StickyError):
    """A commit lost a race and was asked to fail rather than win."""

    exit_code = 5


class BusyError(StickyError):
    """Processes hold files under a path that is about to be committed or unmounted."""

    exit_code = 6


class StorageFull(StickyError):
    """The store's filesystem is full; the ref was not moved."""

    exit_code = 7


class BackendError(StickyError):
    """The storage backend failed."""

    exit_code = 8


class UnsafePath(BackendError):
    """A manifest entry that is absolute, climbs with ``..`` or goes through a symlink."""

    exit_code = 9


class AuthError(StickyError):
    """A stickyci server refused the request's token (401) or its scopes (403)."""

    exit_code = 10


class Forbidden(AuthError):
    """A valid token asked for something outside its scopes (403)."""
