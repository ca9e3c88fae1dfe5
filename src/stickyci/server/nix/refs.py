"""Reference normalisation: a NAR with its store paths blanked out, and the list to restore them.

A rebuilt store path differs from its previous build mostly where it names its dependencies
(``/nix/store/<hash>-<name>``: RPATHs, shebangs, configuration), and a changed hash changes
every chunk it occurs in. So the server chunks the NAR with each store path's base name
(``<hash>-<name>``) overwritten by a placeholder of the same length, and keeps the originals
as a **patch list**: ``(offset, base name)`` pairs, offsets into the NAR. A rebuild whose only
change is its references then normalises to the bytes already stored, and adds only its patch
list. The length is kept so that offsets are the same in both forms and a chunk can be patched
on its own as it streams out.

Nix finds references by their 32-character hash part alone; this scan looks for them under the
store directory (``/nix/store/``), which is where they occur in practice. A hash written any
other way is left as it is: it costs deduplication, never correctness, since normalising only
ever overwrites bytes the patch list records. The served NAR is checked against its NarHash
after patching, so a wrong patch list is caught before a byte reaches Nix.

The patch list is kept in the NAR's pin and read back from the store, which is not trusted:
:func:`parse_patches` bounds it (offsets inside the NAR, sorted, not overlapping, base names in
the store path grammar with a Nix base-32 hash) before anything uses it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from ...errors import IntegrityError

STORE_PREFIX = b"/nix/store/"
FILLER = b"e"
"""What a base name is overwritten with: 'e' is no Nix base-32 digit, so no placeholder is
itself a hash (a NAR normalised twice is the same), and its runs compress to nothing."""
_BASENAME = rb"[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,210}"
# Nix's grammar of a store path's name (libstore/path.cc): up to 211 characters, no leading dot.
_FIND = re.compile(re.escape(STORE_PREFIX) + b"(" + _BASENAME + b")")
_ONE = re.compile(_BASENAME)
MAX_MATCH = len(STORE_PREFIX) + 32 + 1 + 211
"""The longest store path :data:`_FIND` matches: a scan that stops this far from the end of
what has arrived finds every store path whole."""
HEADER = b"stickyci-nix-refs 1\n"


class Patch(NamedTuple):
    """One store path base name at ``offset`` in the NAR."""

    offset: int
    name: bytes


def normalise(nar: bytearray) -> list[Patch]:
    """Blank out every store path base name in ``nar`` (changed in place); return what was
    there, in order."""
    return normalise_from(nar, 0, final=True)[0]


def normalise_from(buf: bytearray, start: int, *, final: bool) -> tuple[list[Patch], int]:
    """Normalise ``buf`` from ``start`` as far as is certain with what it holds: unless
    ``final``, a store path that begins in its last ``MAX_MATCH`` bytes may go on in bytes
    still to come, so it is left for the next call. Return the patches (offsets into ``buf``)
    and where the next call starts."""
    limit = len(buf) if final else len(buf) - MAX_MATCH
    if limit <= start:
        return [], start
    # Found first, then overwritten: the scan reads the buffer it would otherwise change.
    found = []
    for m in _FIND.finditer(buf, start):
        if m.start() >= limit:
            break
        found.append(Patch(m.start(1), m.group(1)))
    for p in found:
        buf[p.offset : p.offset + len(p.name)] = FILLER * len(p.name)
    return found, max(limit, found[-1].offset + len(found[-1].name) if found else limit)


def encode_patches(patches: Iterable[Patch]) -> bytes:
    """The stored form: a header line, then ``<offset> <base name>`` lines."""
    return HEADER + b"".join(b"%d %s\n" % (p.offset, p.name) for p in patches)


def parse_patches(data: bytes, size: int, what: str) -> tuple[Patch, ...]:
    """A stored patch list of a ``size``-byte NAR, checked; ``IntegrityError`` naming ``what``
    and the first line at fault otherwise."""
    if not data.startswith(HEADER):
        raise IntegrityError(f"{what} is not a stickyci patch list")
    if not data.endswith(b"\n"):
        raise IntegrityError(f"{what} does not end with a newline: it is truncated")
    out: list[Patch] = []
    end = 0
    for n, line in enumerate(data[len(HEADER):].split(b"\n")[:-1], 2):
        offset_text, _, name = line.partition(b" ")
        if not (offset_text.isdigit() and len(offset_text) <= 19 and _ONE.fullmatch(name)):
            raise IntegrityError(f"{what} line {n} is not '<offset> <store path base name>'")
        offset = int(offset_text)
        if offset < end:
            raise IntegrityError(f"{what} line {n}: offset {offset} overlaps or precedes "
                                 "the patch before it")
        end = offset + len(name)
        if end > size:
            raise IntegrityError(f"{what} line {n}: offset {offset} is outside the "
                                 f"{size}-byte NAR")
        out.append(Patch(offset, name))
    return tuple(out)


def restore(chunks: Iterable[bytes], patches: tuple[Patch, ...]) -> Iterator[bytes]:
    """``chunks`` of a normalised NAR, in order, with the base names written back; a name
    that spans two chunks is written into both."""
    pos, first = 0, 0
    for data in chunks:
        stop = pos + len(data)
        while first < len(patches) and patches[first].offset + len(patches[first].name) <= pos:
            first += 1
        if first == len(patches) or patches[first].offset >= stop:
            pos = stop
            yield data
            continue
        out = bytearray(data)
        i = first
        while i < len(patches) and patches[i].offset < stop:
            p = patches[i]
            lo, hi = max(p.offset, pos), min(p.offset + len(p.name), stop)
            out[lo - pos : hi - pos] = p.name[lo - p.offset : hi - p.offset]
            i += 1
        pos = stop
        yield bytes(out)
