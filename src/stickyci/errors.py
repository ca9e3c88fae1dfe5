"""One rooted exception tree; every message is written for the user, on one line.

    StickyError                    exit 1   anything stickyci reports
    ├── UsageError                 exit 2   bad input: key, path, option, URL
    │   ├── InvalidKey
    │   ├── NotAMount
    │   └── TooLarge                         a request body over the server's limit
    ├── NotFound                   exit 3   a disk, generation or object that does not exist
    ├── IntegrityError             exit 4   stored bytes that do not match their name
    │   └── UnsafePath             exit 9   a manifest path that would escape its root
    ├── ConflictError              exit 5   another writer won a race we were told not to lose
    ├── BusyError                  exit 6   processes hold the path (or the address `serve`
    │                                        would listen on); the message names them
    ├── StorageFull                exit 7   the store ran out of space; nothing was published
    ├── BackendError               exit 8   the store failed, neither known transient nor not
    │   ├── StoreUnavailable       exit 8   transient: unreachable, timed out, overloaded,
    │   │                                    restarting; retrying later may succeed
    │   └── StoreMisconfigured     exit 11  permanent: credentials refused, bucket missing,
    │                                        access denied; retrying cannot help, fix the setup
    └── AuthError                  exit 10  a server refused the token: missing, bad or expired
        └── Forbidden                         a valid token whose scopes do not cover the request

The CLI maps ``exit_code`` to the process exit status and prints ``str(error)``; it never
prints a traceback for a ``StickyError``.

``str(error)`` is for whoever runs the operation and may name paths, endpoints and buckets.
``summary`` is what a server may tell a remote client about a failure of its own (a 5xx): the
kind of trouble in general terms, never an internal name. A raise site that knows more, and
knows it is safe to say, passes ``summary=``.
"""

from __future__ import annotations


class StickyError(Exception):
    """Base of every error stickyci raises on purpose."""

    exit_code = 1
    summary = "the server failed to handle the request"

    def __init__(self, message: str = "", *, summary: str | None = None) -> None:
        super().__init__(message)
        if summary is not None:
            self.summary = summary


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
    summary = "the server's store holds damaged data"


class UnsafePath(IntegrityError):
    """A manifest entry that is absolute, climbs with ``..`` or goes through a symlink: a
    hostile or corrupt manifest is bad data, not a failing store."""

    exit_code = 9


class ConflictError(StickyError):
    """A commit lost a race and was asked to fail rather than win."""

    exit_code = 5


class BusyError(StickyError):
    """Processes hold files under a path that is about to be committed or unmounted, or the
    address a server was asked to listen on."""

    exit_code = 6


class StorageFull(StickyError):
    """The store's filesystem is full; the ref was not moved."""

    exit_code = 7
    summary = "the server's store is full; nothing was stored"


class BackendError(StickyError):
    """The storage backend failed, and whether a retry could help is not known."""

    exit_code = 8
    summary = "the server's store failed"


class StoreUnavailable(BackendError):
    """Transient store trouble (unreachable, timed out, overloaded, restarting): a later
    attempt may succeed, so clients retry it."""

    summary = "the server's store is unavailable (unreachable, timing out or overloaded)"


class StoreMisconfigured(BackendError):
    """Permanent store trouble (credentials refused, bucket missing, access denied, a server's
    state it cannot read): every attempt fails the same way until someone fixes the
    configuration, so nobody retries."""

    exit_code = 11
    summary = "the server's store is misconfigured (it refuses the server's access)"


class AuthError(StickyError):
    """A stickyci server refused the request's token (401) or its scopes (403)."""

    exit_code = 10


class Forbidden(AuthError):
    """A valid token asked for something outside its scopes (403)."""
