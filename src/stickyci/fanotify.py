"""fanotify pre-content events through ctypes: a group, inode marks, events and answers.

Only what a filler needs (Linux 6.14+): a ``FAN_CLASS_PRE_CONTENT`` group (event fds opened
read-only: a read through an overlay reports the lower file on the overlay's read-only
private mount), inode marks for ``FAN_PRE_ACCESS``, and answers that allow or deny with an
errno.
Constants and layouts are those of ``include/uapi/linux/fanotify.h``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_PRE_CONTENT = 0x08
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_OPEN_PERM = 0x00010000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_PRE_ACCESS = 0x00100000
FAN_Q_OVERFLOW = 0x00004000
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
FAN_EVENT_INFO_TYPE_RANGE = 6
_ERRNO_SHIFT = 24
# The errno values a deny may carry (the kernel refuses others).
DENY_ERRNOS = frozenset({errno.EIO, errno.EPERM, errno.EBUSY, errno.ETXTBSY, errno.EAGAIN,
                         errno.ENOSPC, errno.EDQUOT})

_METADATA = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HEADER = struct.Struct("=BBH")  # info_type, pad, len
_RANGE = struct.Struct("=4xIQQ")  # header, pad, offset, count
_RESPONSE = struct.Struct("=iI")
_METADATA_VERSION = 3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]


class Event(NamedTuple):
    """One event: its mask, the fd of the file (the reader's own must be closed by the
    caller), the process that caused it, and the byte range asked for (offset, length; the
    whole file when the kernel gave none)."""

    mask: int
    fd: int
    pid: int
    offset: int
    length: int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return ret


def init() -> int:
    """A new pre-content group (close-on-exec, unlimited queue and marks); its fd.

    ``OSError`` (EINVAL, EPERM, ENOSYS) where this kernel or this process cannot have one.
    """
    flags = FAN_CLOEXEC | FAN_CLASS_PRE_CONTENT | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS
    return _check(_libc.fanotify_init(flags, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC),
                  "fanotify_init")


def mark(group: int, fd: int, mask: int = FAN_PRE_ACCESS) -> None:
    """Ask for ``mask`` events on the inode of the open file ``fd``."""
    _check(_libc.fanotify_mark(group, FAN_MARK_ADD, mask, fd, None), "fanotify_mark")


def unmark(group: int, fd: int, mask: int = FAN_PRE_ACCESS) -> None:
    """Stop ``mask`` events on the inode of ``fd``; a missing mark is not an error."""
    with contextlib.suppress(FileNotFoundError):
        _check(_libc.fanotify_mark(group, FAN_MARK_REMOVE, mask, fd, None), "fanotify_mark")


def read_events(group: int, size: int = 64 * 1024) -> Iterator[Event]:
    """The events a read of the group returns (blocks unless the group is non-blocking)."""
    data = os.read(group, size)
    pos = 0
    while pos + _METADATA.size <= len(data):
        length, vers, _, meta_len, mask, fd, pid = _METADATA.unpack_from(data, pos)
        if vers != _METADATA_VERSION or length < _METADATA.size:
            raise OSError(errno.EPROTO, f"fanotify metadata version {vers} is not "
                          f"{_METADATA_VERSION}")
        offset, length_asked = 0, -1
        info = pos + meta_len
        while info + _INFO_HEADER.size <= pos + length:
            kind, _, info_len = _INFO_HEADER.unpack_from(data, info)
            if info_len == 0:
                break
            if kind == FAN_EVENT_INFO_TYPE_RANGE and info_len >= _RANGE.size:
                _, offset, length_asked = _RANGE.unpack_from(data, info)
            info += info_len
        yield Event(mask, fd, pid, offset, length_asked)
        pos += length


def respond(group: int, fd: int, allow: bool, err: int = 0) -> None:
    """Answer the permission event of ``fd``: allow, or deny with ``err`` (EPERM if 0)."""
    if allow:
        response = FAN_ALLOW
    else:
        response = FAN_DENY | ((err & 0xFF) << _ERRNO_SHIFT if err in DENY_ERRNOS else 0)
    os.write(group, _RESPONSE.pack(fd, response))


def answer_stale(group: int, fd: int, err: int = errno.EIO) -> bool:
    """Deny a pending event of a reader that died before answering it, by its fd number.

    The kernel matches an answer to its event by the fd number only, so a new filler can
    release readers a killed one left blocked. True if there was such an event.
    """
    try:
        respond(group, fd, False, err)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL):
            return False
        raise
    return True
