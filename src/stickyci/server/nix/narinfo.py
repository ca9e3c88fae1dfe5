"""Nix's ``.narinfo`` files: parsed strictly into a :class:`NarInfo`, rendered back, fingerprinted.

A narinfo comes from a writer the server does not trust, so every field it keeps is checked
against the grammar Nix itself accepts (store path names, Nix's base-32 hashes) and held as a
typed value; nothing a writer sends is ever used as a path. The fields the server decides
itself (``URL``, ``Compression``, ``FileHash``, ``FileSize`` and ``Sig``) are read and dropped:
the server serves the NAR in its own compression and signs with the cache's own key.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from ...errors import UsageError

STORE_DIR = "/nix/store"
MAX_NARINFO = 1 << 20
"""The largest narinfo accepted (a path with ten thousand references fits)."""

_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's base 32: no e, o, u, t
_DIGIT = {c: i for i, c in enumerate(_ALPHABET)}
HASH_PART = re.compile(r"[0-9a-df-np-sv-z]{32}")
# A store path's name, as Nix checks it (libstore/path.cc): at most 211 characters of these,
# not starting with a dot.
_BASENAME = re.compile(r"([0-9a-df-np-sv-z]{32})-([A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,210})")
_CA = re.compile(r"(text|fixed):(r:)?[a-z0-9]+:[0-9a-zA-Z+/=]+")
_KEPT = ("StorePath", "NarHash", "NarSize", "References", "Deriver", "CA")
_SERVED = ("URL", "Compression", "FileHash", "FileSize", "Sig", "System")


def nix32(raw: bytes) -> str:
    """``raw`` in Nix's base 32 (least significant bits first, as Nix prints hashes)."""
    length = (len(raw) * 8 - 1) // 5 + 1
    out = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = raw[i] >> j
        if i + 1 < len(raw):
            c |= raw[i + 1] << (8 - j)
        out.append(_ALPHABET[c & 0x1F])
    return "".join(out)


def parse_nix32(text: str, size: int) -> bytes:
    """``size`` bytes written in Nix's base 32; ``ValueError`` if ``text`` is not exactly that."""
    if len(text) != (size * 8 - 1) // 5 + 1:
        raise ValueError(f"{len(text)} base-32 digits do not make {size} bytes")
    raw = bytearray(size)
    for n, ch in enumerate(reversed(text)):
        digit = _DIGIT.get(ch)
        if digit is None:
            raise ValueError(f"{ch!r} is not a Nix base-32 digit")
        i, j = divmod(n * 5, 8)
        raw[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < size:
            raw[i + 1] |= carry
        elif carry:
            raise ValueError("the base-32 digits overflow the hash")
    return bytes(raw)


def parse_sha256(text: str, what: str = "hash") -> bytes:
    """A SHA-256 as Nix writes one (``sha256:`` then base 32 or 16, or SRI ``sha256-…``);
    ``what`` names it in the error."""
    try:
        if text.startswith("sha256-"):
            raw = base64.b64decode(text[7:], validate=True)
        else:
            value = text.removeprefix("sha256:")
            if value == text:
                raise ValueError("no sha256: prefix")
            raw = (bytes.fromhex(value) if len(value) == 64
                   else parse_nix32(value, 32))
    except (ValueError, binascii.Error) as exc:
        raise UsageError(f"{what} {text[:80]!r} is not a SHA-256 as Nix writes it "
                         f"(sha256:<base 32>): {exc}") from exc
    if len(raw) != 32:
        raise UsageError(f"{what} {text[:80]!r} is not a SHA-256: it has {len(raw)} bytes, "
                         "not 32")
    return raw


def check_basename(text: str, what: str) -> str:
    """``text`` if it is a store path's base name (``<hash>-<name>``), else ``UsageError``."""
    if not _BASENAME.fullmatch(text):
        raise UsageError(f"{what} {text[:120]!r} is not a Nix store path name "
                         "(32 base-32 characters, '-', then a name)")
    return text


@dataclass(frozen=True, slots=True)
class NarInfo:
    """What the server keeps of a narinfo: the path, its NAR's hash and size, its references."""

    path: str
    """The store path's base name, ``<hash>-<name>`` (the store directory is ``/nix/store``)."""
    nar_hash: bytes
    """The SHA-256 of the uncompressed NAR, 32 bytes."""
    nar_size: int
    references: tuple[str, ...] = ()
    """Base names, sorted."""
    deriver: str | None = None
    ca: str | None = None

    @property
    def hash_part(self) -> str:
        """The 32 characters that name the narinfo (``<hash_part>.narinfo``)."""
        return self.path[:32]

    @property
    def nar_name(self) -> str:
        """The NAR's hash in base 32: the name the server serves it under."""
        return nix32(self.nar_hash)

    def fingerprint(self) -> bytes:
        """What a signature covers, exactly as Nix computes it."""
        refs = ",".join(f"{STORE_DIR}/{r}" for r in self.references)
        return (f"1;{STORE_DIR}/{self.path};sha256:{self.nar_name};{self.nar_size};"
                f"{refs}").encode()

    def render(self, url: str | None = None, compression: str | None = None,
               sigs: tuple[str, ...] = ()) -> str:
        """The narinfo text; without ``url`` it is the form the server stores."""
        lines = [f"StorePath: {STORE_DIR}/{self.path}"]
        if url is not None:
            lines += [f"URL: {url}", f"Compression: {compression or 'none'}"]
        lines += [f"NarHash: sha256:{self.nar_name}", f"NarSize: {self.nar_size}",
                  f"References: {' '.join(self.references)}"]
        if self.deriver:
            lines.append(f"Deriver: {self.deriver}")
        if self.ca:
            lines.append(f"CA: {self.ca}")
        lines += [f"Sig: {s}" for s in sigs]
        return "\n".join(lines) + "\n"


def parse_narinfo(data: bytes, what: str = "narinfo") -> NarInfo:
    """Parse a narinfo strictly; ``UsageError`` names the first field at fault."""
    if len(data) > MAX_NARINFO:
        raise UsageError(f"{what} is {len(data)} bytes; a narinfo is at most {MAX_NARINFO}")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not UTF-8 text") from exc
    fields: dict[str, str] = {}
    for n, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep or not key.isalnum() or any(ord(c) < 32 for c in value):
            raise UsageError(f"{what} line {n} is not 'Key: value'")
        if key in _KEPT and key in fields:
            raise UsageError(f"{what} gives {key} twice (line {n})")
        if key in _KEPT:
            fields[key] = value
        # The server's own fields (_SERVED) and ones a newer Nix may add are not kept.
    for key in ("StorePath", "NarHash", "NarSize"):
        if key not in fields:
            raise UsageError(f"{what} has no {key} field")
    store_path = fields["StorePath"]
    if not store_path.startswith(STORE_DIR + "/"):
        raise UsageError(f"{what}: StorePath {store_path[:120]!r} is not under {STORE_DIR}")
    path = check_basename(store_path[len(STORE_DIR) + 1:], f"{what}: StorePath")
    size_text = fields["NarSize"]
    if not size_text.isdigit() or not 0 < int(size_text) < 2**63:
        raise UsageError(f"{what}: NarSize {size_text[:40]!r} is not a positive size")
    refs = sorted(set(fields.get("References", "").split()))
    for r in refs:
        check_basename(r, f"{what}: References entry")
    deriver = fields.get("Deriver") or None
    if deriver is not None and deriver != "unknown-deriver":
        if not deriver.endswith(".drv"):
            raise UsageError(f"{what}: Deriver {deriver[:120]!r} is not a .drv")
        check_basename(deriver, f"{what}: Deriver")
    elif deriver is not None:
        deriver = None
    ca = fields.get("CA") or None
    if ca is not None and not _CA.fullmatch(ca):
        raise UsageError(f"{what}: CA {ca[:120]!r} is not a content address")
    nar_hash = parse_sha256(fields["NarHash"], f"{what}: NarHash")
    return NarInfo(path, nar_hash, int(size_text), tuple(refs), deriver, ca)
