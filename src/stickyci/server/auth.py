"""Scoped tokens: who may read, write or delete which disk keys, checked on every request.

A token is ``sci_<id>_<secret>``. The server keeps only the SHA-256 of the secret, in
``tokens.json`` under its state directory, so a leaked state directory leaks no tokens. Scopes
are glob patterns over disk keys (``main-*``, ``pr-123-*``) per permission; ``write`` implies
``read`` on the same patterns, and so does ``delete`` (removing a disk reads it first);
``admin`` implies everything. Content-addressed objects (packs,
Bazel CAS) carry no key: reading them needs some read scope, writing some write scope, and
deleting them (garbage collection) needs admin. A blank pattern grants nothing, wherever it
comes from: ``create`` refuses one, and ``Scope.allows`` ignores one already in a token file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import AuthError, Forbidden, NotFound, StoreMisconfigured, UsageError

TOKEN_FILE = "tokens.json"
_PREFIX = "sci"
# A disk key's characters plus fnmatch's; anything else could never match a key.
_PATTERN = re.compile(r"^[A-Za-z0-9._*?\[\]!-]+$")


class Permission(enum.StrEnum):
    """What a request does."""

    READ = "read"
    WRITE = "write"
    DELETE = "delete"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Scope:
    """Patterns per permission; an empty tuple grants nothing."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    admin: bool = False

    def allows(self, perm: Permission, key: str | None) -> bool:
        """Whether this scope permits ``perm`` on disk ``key`` (None: an unkeyed object)."""
        if self.admin:
            return True
        patterns = [p for p in {
            Permission.READ: self.read + self.write + self.delete,
            Permission.WRITE: self.write,
            Permission.DELETE: self.delete,
            Permission.ADMIN: (),
        }[perm] if isinstance(p, str) and p.strip()]  # a token file may hold anything
        if key is None:
            return bool(patterns)
        return any(fnmatchcase(key, p) for p in patterns)


ANONYMOUS = "anonymous"
ANONYMOUS_READ = Scope(read=("*",))


@dataclass(slots=True)
class Token:
    """A stored token: never the secret, only its hash."""

    id: str
    digest: str
    name: str
    created: float
    expires: float | None
    read: list[str] = field(default_factory=list)
    write: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    admin: bool = False

    @property
    def scope(self) -> Scope:
        """The permissions this token grants."""
        return Scope(tuple(self.read), tuple(self.write), tuple(self.delete), self.admin)

    def public(self) -> dict[str, object]:
        """Everything but the hash, for listings."""
        data = asdict(self)
        del data["digest"]
        return data


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: a token id (or ``anonymous``) and what it may do."""

    id: str
    scope: Scope

    def require(self, perm: Permission, key: str | None, what: str) -> None:
        """Raise ``Forbidden`` naming the token, the permission and the object."""
        if not self.scope.allows(perm, key):
            if self.id == ANONYMOUS:
                # No credentials were sent: 401 says a token would help, 403 would say it can't.
                raise AuthError(f"{perm.value} on {what} needs a token: send Authorization: "
                                "Bearer TOKEN")
            raise Forbidden(f"token {self.id} may not {perm.value} {what}; create a token "
                            f"whose --{perm.value} pattern covers it")


def check_pattern(option: str, pattern: str) -> str:
    """Return ``pattern`` if it can stand in ``--OPTION``: a glob over disk keys, not blank."""
    if not _PATTERN.match(pattern):
        raise UsageError(f"--{option} {pattern!r}: a pattern is a glob over disk keys "
                         "(letters, digits, '.', '_', '-' and * ? [ ] !), e.g. pr-123-*")
    return pattern


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_from_header(header: str | None) -> str | None:
    """The token in ``Authorization: Bearer T`` or ``Basic base64(user:T)`` (ccache's form)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


MAX_VERIFIED = 4096
"""Most tokens whose check is remembered (the cache starts over beyond that)."""


class TokenStore:
    """``tokens.json`` in a state directory, re-read whenever it changes on disk.

    The file is looked at (one stat) on every request, so a token created or revoked is
    seen by the next request, in every process of the server. A token that passed its check
    is remembered with the file's version it passed against, so the next request carrying it
    costs a dictionary look-up instead of a parse and a hash.
    """

    def __init__(self, state_dir: Path, anonymous: Scope | None = None) -> None:
        self.path = state_dir / TOKEN_FILE
        self._file = str(self.path)
        self.anonymous = anonymous
        self._seen: tuple[int, int, int] | None = None
        self._tokens: dict[str, Token] = {}
        # token as sent → (the token file's contents it was checked against, its principal)
        self._verified: dict[str, tuple[dict[str, Token], Token, Principal]] = {}

    def _load(self) -> dict[str, Token]:
        try:
            st = os.stat(self._file)
        except FileNotFoundError:
            self._seen, self._tokens = None, {}
            return self._tokens
        # The inode too: an edit is a rename of a new file, whatever its size and timestamp.
        if self._seen != (st.st_ino, st.st_mtime_ns, st.st_size):
            try:
                rows = json.loads(self.path.read_bytes())["tokens"]
                self._tokens = {t["id"]: Token(**t) for t in rows}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # The server's own state, not the request: a 500 whose body names no path.
                raise StoreMisconfigured(
                    f"token file {self.path} is unreadable ({exc}); restore it or delete it "
                    "and create new tokens",
                    summary="the server's token file is unreadable") from exc
            self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        return self._tokens

    def authenticate(self, header: str | None, now: float | None = None) -> Principal:
        """The principal behind an ``Authorization`` header; ``AuthError`` if it has none."""
        raw = token_from_header(header)
        if raw is None:
            if self.anonymous is not None:
                return Principal(ANONYMOUS, self.anonymous)
            raise AuthError("this server needs a token: send Authorization: Bearer TOKEN "
                            "(STICKYCI_TOKEN for stickyci)")
        tokens = self._load()
        known = self._verified.get(raw)
        if known is not None and known[0] is tokens:
            token, principal = known[1], known[2]
        else:
            prefix, _, rest = raw.partition("_")
            token_id, _, secret = rest.partition("_")
            found = tokens.get(token_id) if prefix == _PREFIX else None
            if found is None or not hmac.compare_digest(found.digest, _hash(secret)):
                raise AuthError("the token is not valid on this server; check STICKYCI_TOKEN")
            token, principal = found, Principal(found.id, found.scope)
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
            self._verified[raw] = (tokens, token, principal)
        if token.expires is not None and token.expires <= (now or time.time()):
            raise AuthError(f"token {token.id} expired at "
                            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(token.expires))}; "
                            "create a new one with stickyci token create")
        return principal

    def create(self, *, name: str = "", read: list[str] | None = None,
               write: list[str] | None = None, delete: list[str] | None = None,
               admin: bool = False, ttl: float | None = None) -> tuple[str, Token]:
        """Add a token; returns the only copy of its secret form and its stored record."""
        if not (read or write or delete or admin):
            raise UsageError("a token needs at least one of --read, --write, --delete, --admin")
        for option, patterns in (("read", read), ("write", write), ("delete", delete)):
            for pattern in patterns or ():
                check_pattern(option, pattern)
        if ttl is not None and not (ttl > 0 and math.isfinite(ttl)):
            raise UsageError(f"a token's lifetime must be a positive duration, not {ttl!r} s; "
                             "omit --expires for a token that never expires")
        now = time.time()
        token = Token(id=secrets.token_hex(4), digest="", name=name, created=now,
                      expires=None if ttl is None else now + ttl, read=list(read or ()),
                      write=list(write or ()), delete=list(delete or ()), admin=admin)
        secret = secrets.token_urlsafe(32)
        token.digest = _hash(secret)
        with self._edit() as tokens:
            tokens[token.id] = token
        return f"{_PREFIX}_{token.id}_{secret}", token

    def revoke(self, token_id: str) -> None:
        """Remove a token; requests carrying it fail from the next request on."""
        with self._edit() as tokens:
            if tokens.pop(token_id, None) is None:
                raise NotFound(f"no token {token_id!r}; see stickyci token ls")

    def list(self) -> list[Token]:
        """Every stored token."""
        return sorted(self._load().values(), key=lambda t: t.created)

    @contextlib.contextmanager
    def _edit(self) -> Iterator[dict[str, Token]]:
        # One editor at a time; readers see the old or the new file, never half of one.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._seen = None
            tokens = dict(self._load())
            yield tokens
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"tokens": [asdict(t) for t in tokens.values()]}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
