"""Repacking: the objects of a pack that are still wanted, copied into new packs, verified on the
way; then the old pack and its index deleted.

The pack layer's half of garbage collection, as restic's ``internal/repository/repack.go`` is:
deciding what is live (from disk refs) is ``stickyci.disks.gc``'s; moving bytes between packs
is this module's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .. import codec
from ..errors import IntegrityError
from .backend import Backend
from .objects import IndexEntry, ObjectStore

log = logging.getLogger("stickyci")


def repack(backend: Backend, pack: str, index: str, keep: Sequence[IndexEntry]) -> set[str]:
    """Copy the objects ``keep`` lists out of ``pack`` into new packs, then delete ``pack`` and
    its ``index``; return the new packs.

    Every object is verified before it is carried over; one that does not verify is dropped
    with a warning.
    """
    # Its own objects only: a place the local index knows is the pack about to be deleted.
    fresh = ObjectStore(backend, load_index=False, local_index=False)
    for d, off, ln in keep:
        envelope = backend.get(pack, off, ln)
        try:
            codec.decode(envelope, d)
        except IntegrityError as exc:
            # Never carried into a new pack. A good copy in a newer pack stays: this pack's
            # claim on it fails verification there once this pack is gone.
            log.warning("gc: %s: %s; not carried over", pack, exc)
            continue
        fresh.put_envelope(d, envelope)
    fresh.flush()
    backend.delete(index)
    backend.delete(pack)
    return {loc.pack for d, _, _ in keep if (loc := fresh.locate(d)) is not None}
