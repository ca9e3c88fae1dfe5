"""Reference normalisation in the Nix binary cache: a NAR is chunked with its store paths blanked
out, and they are written back as it is served.

A rebuild whose only change is a dependency's store path adds almost nothing, and the rebuilt
path substitutes back bit for bit through the real Nix; the patch list read from the store is
bounded before anything uses it.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MiB
from nix_helpers import Nix, needs_nix, public_key, settled, tree_bytes
from server import Server, start_server, store_dir

from stickyci.errors import IntegrityError
from stickyci.server.nix.chunks import CHUNKER, ChunkStream
from stickyci.server.nix.refs import (
    FILLER,
    HEADER,
    Patch,
    encode_patches,
    normalise,
    parse_patches,
    restore,
)
from stickyci.store import LocalBackend, ObjectStore

H1 = b"0123456789abcdfghijklmnpqrsvwxyz"  # every Nix base-32 digit once
H2 = b"zyxwvsrqpnmlkjihgfdcba9876543210"

# b embeds its dependency's store path twice around 4 MiB of fixed data: a rebuild against
# another a changes only those two places.
_REBUILT = """
let a = derivation {{ name = "a-{tag}"; system = builtins.currentSystem; builder = "/bin/sh";
                     args = ["-c" "echo {tag} > $out"]; }};
in derivation {{ name = "b"; system = builtins.currentSystem; builder = "/bin/sh";
                args = ["-c" "set -e; echo ${{a}}/lib > $out; /bin/cat ${{{data}}} >> $out;
                              echo ${{a}} >> $out"]; }}
"""


def nar_with(*names: bytes, gap: int = 1000) -> bytes:
    """Random bytes with ``/nix/store/<name>`` every ``gap`` bytes."""
    rng = random.Random(7)
    return b"".join(rng.randbytes(gap) + b"/nix/store/" + n + b"/lib" for n in names) \
        + rng.randbytes(gap)


def test_normalise_then_restore_gives_the_nar_back_whatever_the_chunk_boundaries() -> None:
    nar = nar_with(H1 + b"-zlib-1.2", H2 + b"-openssl-3.0:", H1 + b"-zlib-1.2", gap=50)
    work = bytearray(nar)
    patches = normalise(work)
    assert [p.name for p in patches] == [H1 + b"-zlib-1.2", H2 + b"-openssl-3.0",
                                         H1 + b"-zlib-1.2"]
    assert H1 not in work and H2 not in work and len(work) == len(nar)
    assert normalise(bytearray(work)) == []  # a placeholder is no hash
    # every cut, including through the middle of a name and one byte at a time
    for size in (1, 7, 33, 64, len(nar)):
        pieces = [bytes(work[i:i + size]) for i in range(0, len(work), size)]
        assert b"".join(restore(pieces, tuple(patches))) == nar
    parsed = parse_patches(encode_patches(patches), len(nar), "the list")
    assert parsed == tuple(patches)


def test_another_dependency_normalises_to_the_same_bytes() -> None:
    one, two = bytearray(nar_with(H1 + b"-zlib-1.2")), bytearray(nar_with(H2 + b"-zlib-1.3"))
    assert normalise(one) != normalise(two)
    assert one == two


@pytest.mark.parametrize(("listing", "fault"), [
    (b"10 " + H1 + b"-a\n", "not a stickyci patch list"),
    (HEADER + b"10 " + H1 + b"-a", "truncated"),
    (HEADER + b"995 " + H1 + b"-a\n", "outside the 1000-byte NAR"),  # ends past the end
    (HEADER + b"10 " + H1 + b"-a\n20 " + H2 + b"-b\n", "overlaps"),
    (HEADER + b"100 " + H1 + b"-a\n10 " + H2 + b"-b\n", "overlaps or precedes"),
    (HEADER + b"-1 " + H1 + b"-a\n", "line 2 is not"),
    (HEADER + b"10 " + b"e" * 32 + b"-a\n", "line 2 is not"),  # 'e' is no base-32 digit
    (HEADER + b"10 " + H1 + b"-.hidden\n", "line 2 is not"),  # no name starts with a dot
    (HEADER + b"10 " + H1 + b"-a/../../etc\n", "line 2 is not"),
    (HEADER + b"99999999999999999999 " + H1 + b"-a\n", "line 2 is not"),
])
def test_a_stored_patch_list_is_bounded_before_use(listing: bytes, fault: str) -> None:
    with pytest.raises(IntegrityError, match=fault):
        parse_patches(listing, 1000, "the patch list of x")


def test_the_filler_is_no_nix_base_32_digit() -> None:
    assert FILLER not in b"0123456789abcdfghijklmnpqrsvwxyz"
    assert parse_patches(HEADER + b"0 " + H1 + b"-a\n", 40, "x") == (Patch(0, H1 + b"-a"),)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("nixrefs")) as s:
        yield s


@needs_nix
def test_a_rebuild_that_only_changed_a_reference_adds_almost_nothing_and_substitutes_whole(
        srv: Server, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(4 * MiB))
    writer = Nix(tmp_path / "writer")
    built = {}
    for tag in ("v1", "v2"):
        expr = tmp_path / f"{tag}.nix"
        expr.write_text(_REBUILT.format(tag=tag, data=data))
        built[tag] = writer.run("nix-build", "--option", "sandbox-paths",
                                "/bin /lib /lib64 /usr", str(expr),
                                "--no-out-link").stdout.split()[-1]
    b1, b2 = built["v1"], built["v2"]
    assert b1 != b2 and writer.read(b1) != writer.read(b2)
    token = srv.token("--write", "refs*")
    url = f"{srv.url}/nix/refs?compression=zstd"
    netrc = writer.netrc("127.0.0.1", token)
    store = store_dir(srv)
    before = tree_bytes(store)
    assert writer.copy_to(url, b1, netrc=netrc).returncode == 0
    settled(srv.state)
    first = tree_bytes(store) - before
    assert first > 4 * MiB
    assert writer.copy_to(url, b2, netrc=netrc).returncode == 0
    settled(srv.state)
    second = tree_bytes(store) - before - first
    # a's new version, b's patch list, manifest, pin and narinfo: no chunk of b's data
    assert second < 0.02 * first, f"the rebuild added {second} bytes of {first}"

    reader = Nix(tmp_path / "reader")
    got = reader.substitute(url.split("?")[0], public_key(srv.state, "refs"), b2,
                            netrc=reader.netrc("127.0.0.1", token))
    assert got.returncode == 0, got.stderr
    assert reader.read(b2) == writer.read(b2)
    assert hashlib.sha256(reader.dump(b2)).digest() == hashlib.sha256(writer.dump(b2)).digest()
    reader.run("nix-store", "--verify-path", b2)


@pytest.mark.parametrize("step", [1 << 16, 1_000_003, 5 << 20])
def test_a_nar_streamed_in_any_pieces_cuts_and_normalises_as_if_whole(tmp_path: Path,
                                                                      step: int) -> None:
    rng = random.Random(1)
    nar = b"".join(rng.randbytes(rng.randrange(1, 200_000)) + b"/nix/store/" + H1
                   + b"-dep-%d/lib" % i for i in range(300))
    objects = ObjectStore(LocalBackend(tmp_path))
    stream = ChunkStream(objects)
    for i in range(0, len(nar), step):
        stream.feed(nar[i:i + step])
    chunks, patches = stream.finish()
    objects.flush()
    whole = bytearray(nar)
    assert list(patches) == normalise(whole) and len(patches) == 300
    # the cuts a FastCDC makes over the whole normalised NAR, so pieces never cost dedup
    assert [n for _, n in chunks] == [c.length for c in CHUNKER.cut_buf(bytes(whole))]
    assert b"".join(restore((objects.get(d) for d, _ in chunks), patches)) == nar
