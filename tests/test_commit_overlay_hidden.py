"""What an overlay commit takes as deleted: exactly the lower paths under a whiteout, an opaque
directory or an upper non-directory, however their names sort next to their neighbours'; and
the manifest it splices into its base's describes the tree a full commit of it describes (its
small files bundled otherwise: the commit bundles only what it read)."""

from __future__ import annotations

import shutil

import pytest
from helpers import Env, described

from stickyci.digest import Digest
from stickyci.snapshot import snapshot_tree
from stickyci.store import LocalBackend, ObjectStore


@pytest.mark.root
def test_only_what_lies_under_a_deleted_or_replaced_path_is_hidden(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    # "a/b.c" and "a/b-x" sort between "a/b" and "a/b/..." ('-' and '.' come before '/'),
    # and "a/ba" after them: none of them is under "a/b".
    for rel in ("a/b/f", "a/b/g/h", "a/b.c/f", "a/b-x", "a/ba/f", "d/e/f", "d2/f", "keep/f"):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(rel)
    assert env.json("disk", "commit", str(ws))["committed"]

    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    shutil.rmtree(ws / "a" / "b")  # a whiteout on a directory
    shutil.rmtree(ws / "d")
    (ws / "d").write_text("now a file")  # an upper non-directory over a lower directory
    (ws / "keep" / "f").write_text("changed")  # an upper file over a lower file hides nothing
    r = env.json("disk", "commit", str(ws))
    assert r["committed"]
    diff = env.json("disk", "diff", "k")
    assert sorted(diff["removed"]) == ["a/b", "a/b/f", "a/b/g", "a/b/g/h", "d/e", "d/e/f"]
    assert diff["added"] == []
    assert (diff["modified"], diff["metadata"]) == (["d", "keep/f"], ["a"])

    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    files = sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if p.is_file())
    assert files == ["a/b-x", "a/b.c/f", "a/ba/f", "d", "d2/f", "keep/f"]
    assert (ws / "d").read_text() == "now a file"
    other = ObjectStore(LocalBackend(env.root / "other"))
    whole, _ = snapshot_tree(other, str(ws))
    assert described(other, whole) == described(ObjectStore(LocalBackend(env.store)),
                                                 Digest.parse(r["snapshot"]))
    env.run("disk", "unmount", str(ws))
