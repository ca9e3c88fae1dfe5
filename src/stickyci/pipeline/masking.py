"""Masking: secret values replaced with ``***`` in any text that leaves a step, streamed.

Step output is masked as it is read, in bounded memory whatever its shape (no newline for
megabytes, bytes that are not UTF-8), and a secret cut between two reads is still masked.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Mapping

from .plan import MIN_SECRET


class Masker:
    """Replaces secret values with ``***`` in any text that leaves a step.

    A value is masked whole and, stripped of surrounding blanks, line by line: a step can print
    one line of a multi-line secret (a key file, a JSON credential) on its own, indented, or in
    another order. A line shorter than ``MIN_SECRET`` characters (``{``, ``-----``) is not masked
    on its own, for the reason such a secret is refused: it would blank out every log while
    protecting nothing; it is still masked as part of the whole value.
    """

    def __init__(self, secrets: Mapping[str, str]) -> None:
        values: set[str] = set()
        for value in filter(None, secrets.values()):
            values.add(value)
            values.update(line.strip() for line in value.splitlines()
                          if len(line.strip()) >= MIN_SECRET)
        # Output is decoded with errors="replace": a value holding bytes that are not UTF-8
        # (os.environ keeps them as surrogates) is looked for in that form too.
        values |= {_as_output(v) for v in values}
        self.values = sorted(values, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self.values))) if values else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub("***", text) if self._pattern else text

    def split(self, text: str) -> tuple[str, str]:
        """``text`` cut where more text cannot change what is masked: the part before it,
        masked, and the raw rest, which may be the start of a secret.

        The rest is at most one character shorter than the longest secret, so a stream is
        masked in bounded memory, however long its lines, and a secret cut between two reads
        is still masked.
        """
        if self._pattern is None:
            return text, ""
        cut = len(text) - self._held(text)
        out: list[str] = []
        pos = 0
        # A match starting before the cut is final: no secret starting there runs past the
        # end of ``text`` (else the cut would be earlier). It may end after the cut.
        for m in self._pattern.finditer(text):
            if m.start() >= cut:
                break
            out += [text[pos:m.start()], "***"]
            pos = m.end()
        cut = max(cut, pos)
        out.append(text[pos:cut])
        return "".join(out), text[cut:]

    def _held(self, text: str) -> int:
        """The length of the longest end of ``text`` that a secret starts with (not all of it)."""
        held = 0
        for value in self.values:
            start = max(0, len(text) - len(value) + 1)
            # The leftmost candidate is the longest; candidates start with the value's first
            # character, so only those are compared.
            while (i := text.find(value[0], start)) != -1 and len(text) - i > held:
                if value.startswith(text[i:]):
                    held = len(text) - i
                    break
                start = i + 1
        return held


class MaskedStream:
    """Bytes of any shape (no newline for megabytes, not UTF-8) in, masked text out.

    Memory is bounded by what one :meth:`feed` gets plus the longest secret.
    """

    def __init__(self, mask: Masker) -> None:
        self._mask = mask
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._rest = ""

    def feed(self, data: bytes) -> str:
        """The masked text that ``data`` completes (possibly none yet)."""
        done, self._rest = self._mask.split(self._rest + self._decoder.decode(data))
        return done

    def close(self) -> str:
        """Everything still held, masked: the stream has ended."""
        text, self._rest = self._rest + self._decoder.decode(b"", final=True), ""
        return self._mask(text)


def run_masker(secrets: Mapping[str, str]) -> Masker:
    """The masker of a run: its declared secrets and the store token, which steps inherit."""
    return Masker({**secrets, "STICKYCI_TOKEN": os.environ.get("STICKYCI_TOKEN", "")})


def _as_output(value: str) -> str:
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte: not from a byte string
        return value
