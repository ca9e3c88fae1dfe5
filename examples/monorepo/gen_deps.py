#!/usr/bin/env python3
"""Write the sources of the shared dependency layer (several static C libraries) into a directory.

    python3 gen_deps.py DIR [--files N]

writes ``DIR/Makefile`` (a copy of ``deps/Makefile`` next to this script), ``DIR/src/include/
<lib>.h`` (the public headers) and ``DIR/src/<lib>/*.c``; ``make -C DIR -j2`` then builds
``DIR/lib/lib<lib>.a`` and installs the headers in ``DIR/include/``.

The output is deterministic (a fixed pseudo-random generator, no clock, no environment) and a
file is written only if its content changed, so its mtime survives: re-running the generator on
a built tree leaves ``make`` with nothing to do. Files under ``DIR/src`` that the generator no
longer produces are removed. Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAKEFILE_TEMPLATE = HERE / "deps" / "Makefile"
MASK64 = (1 << 64) - 1
FILES_PER_LIB = 24  # five libraries of 24 kernels each (plus one API file): ~30 s with make -j2


@dataclass(frozen=True)
class Lib:
    """One static library: its name, what it is for, and the libraries it calls into."""

    name: str
    summary: str
    deps: tuple[str, ...]


LIBS: tuple[Lib, ...] = (
    Lib("core", "mixing, tables and checksums every other library builds on", ()),
    Lib("codec", "framing and byte transforms", ("core",)),
    Lib("hash", "keyed digests", ("core",)),
    Lib("net", "packet scheduling and routing tables", ("codec", "core")),
    Lib("store", "paging, compaction and index maintenance", ("hash", "codec", "core")),
)


class Rng:
    """splitmix64: small, fast and the same on every Python version and platform."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def u32(self) -> int:
        return self.next() & 0xFFFFFFFF

    def below(self, n: int) -> int:
        return self.next() % n

    def rot(self) -> int:
        return 1 + self.below(31)


def seed_of(text: str) -> int:
    """A stable seed from a name (FNV-1a, 64 bit)."""
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def hex32(value: int) -> str:
    return f"0x{value:08x}u"


def rotl(expr: str, r: int) -> str:
    return f"(({expr} << {r}) | ({expr} >> {32 - r}))"


def table(rng: Rng, name: str, size: int) -> str:
    rows = []
    for i in range(0, size, 6):
        rows.append("    " + ", ".join(hex32(rng.u32()) for _ in range(min(6, size - i))) + ",")
    return f"static const uint32_t {name}[{size}] = {{\n" + "\n".join(rows) + "\n};\n"


def mixer(rng: Rng, index: int) -> str:
    """A small inline helper; it is inlined many times over, which is what makes -O2 work."""
    ops = [
        f"    x ^= {rotl('y', rng.rot())};",
        f"    x *= {hex32(rng.u32() | 1)};",
        f"    x += T[(x >> {rng.below(24)}) & 255] ^ y;",
        f"    y = {rotl('y', rng.rot())} + x;",
        f"    x ^= x >> {1 + rng.below(20)};",
        f"    x = {rotl('x', rng.rot())} ^ {hex32(rng.u32())};",
    ]
    body = "\n".join(ops[rng.below(len(ops))] for _ in range(8))
    return (f"static inline uint32_t mix{index}(uint32_t x, uint32_t y)\n{{\n{body}\n"
            "    return x ^ y;\n}\n")


def step(rng: Rng, struct: str, index: int, mixers: int, cases: int) -> str:
    """One routine: a loop around a switch whose cases update a state struct."""
    lines = [
        f"static uint32_t step{index}(struct {struct} *s, uint32_t x)",
        "{",
        f"    for (unsigned i = 0; i < {8 + rng.below(24)}u; ++i) {{",
        f"        x = mix{rng.below(mixers)}(x ^ T[(x + i) & 255], s->a + i);",
        f"        switch ((x >> {rng.below(20)}) % {cases}u) {{",
    ]
    fields = ("a", "b", "c", "d")
    for case in range(cases):
        f1, f2 = fields[rng.below(4)], fields[rng.below(4)]
        m = rng.below(mixers)
        body = [
            f"            s->{f1} = mix{m}(s->{f1} ^ {hex32(rng.u32())}, s->{f2} + x);",
            f"            s->lane[{rng.below(8)}] ^= (uint8_t)(x >> {rng.below(24)});",
        ]
        if rng.below(2):
            body.append(f"            s->tag = (uint16_t)(s->tag + {rotl('x', rng.rot())});")
        if rng.below(3) == 0:
            inner = rng.below(mixers)
            body += [
                f"            for (unsigned j = 0; j < {2 + rng.below(6)}u; ++j)",
                f"                s->{f2} = mix{inner}(s->{f2}, T[(j * {1 + rng.below(200)}u"
                f" + x) & 255]);",
            ]
        lines += [f"        case {case}:", *body, "            break;"]
    lines += [
        "        default:",
        f"            s->d ^= x * {hex32(rng.u32() | 1)};",
        "            break;",
        "        }",
        "    }",
        f"    return x ^ s->{fields[rng.below(4)]};",
        "}",
        "",
    ]
    return "\n".join(lines)


def kernel_source(lib: Lib, number: int, steps: int = 8, mixers: int = 4, cases: int = 24) -> str:
    """A kernel file: a table, a state struct, inline mixers, steps and one exported entry."""
    rng = Rng(seed_of(f"{lib.name}/{number}"))
    struct = f"{lib.name}_state{number:03d}"
    parts = [
        f"/* Generated by gen_deps.py: {lib.name} kernel {number}. Do not edit. */",
        f'#include "{lib.name}.h"',
        "",
        table(rng, "T", 256),
        f"struct {struct} {{",
        "    uint32_t a, b, c, d;",
        "    uint16_t tag;",
        "    uint8_t lane[8];",
        "};",
        "",
    ]
    parts += [mixer(rng, i) for i in range(mixers)]
    parts += [step(rng, struct, i, mixers, cases) for i in range(steps)]
    entry = [
        f"uint32_t {lib.name}_k{number:03d}(uint32_t seed);",
        f"uint32_t {lib.name}_k{number:03d}(uint32_t seed)",
        "{",
        f"    struct {struct} s = {{seed, ~seed, seed * {hex32(rng.u32() | 1)},"
        f" seed ^ {hex32(rng.u32())}, 0, {{0}}}};",
        "    uint32_t x = seed;",
    ]
    order = [*range(steps), rng.below(steps), rng.below(steps)]
    entry += [f"    x = step{i}(&s, x ^ {hex32(rng.u32())});" for i in order]
    entry += [
        "    for (unsigned i = 0; i < 8u; ++i)",
        "        x = x * 31u + s.lane[i];",
        "    return x ^ s.a ^ s.b ^ s.c ^ s.d ^ s.tag;",
        "}",
        "",
    ]
    return "\n".join(parts + entry)


def api_source(lib: Lib, files: int) -> str:
    """The library's public functions: run every kernel, and a byte transform."""
    decls = "\n".join(f"uint32_t {lib.name}_k{i:03d}(uint32_t seed);" for i in range(files))
    names = "\n".join(f"    {lib.name}_k{i:03d}," for i in range(files))
    calls = "".join(f"\n    acc ^= {dep}_digest(acc);" for dep in lib.deps)
    includes = "".join(f'#include "{dep}.h"\n' for dep in lib.deps)
    n = lib.name
    return f"""/* Generated by gen_deps.py: the {n} library's public functions. Do not edit. */
#include "{n}.h"
{includes}
{decls}

static uint32_t (*const kernels[])(uint32_t) = {{
{names}
}};

unsigned {n}_kernel_count(void)
{{
    return (unsigned)(sizeof kernels / sizeof kernels[0]);
}}

uint32_t {n}_digest(uint32_t seed)
{{
    uint32_t acc = seed ^ {hex32(seed_of(n) & 0xFFFFFFFF)};
    for (unsigned i = 0; i < {n}_kernel_count(); ++i)
        acc = kernels[i](acc + i) * 0x9e3779b1u + (acc >> 7);{calls}
    return acc;
}}

void {n}_transform(const uint8_t *in, size_t len, uint8_t *out)
{{
    uint32_t x = {hex32(seed_of(n + "/transform") & 0xFFFFFFFF)};
    for (size_t i = 0; i < len; ++i) {{
        x = kernels[i % {n}_kernel_count()](x ^ in[i]);
        out[i] = (uint8_t)(in[i] ^ x ^ (x >> 8) ^ (x >> 16) ^ (x >> 24));
    }}
}}

const char *{n}_name(void)
{{
    return "{n}";
}}
"""


def header_source(lib: Lib) -> str:
    n = lib.name
    guard = f"STICKYDEPS_{n.upper()}_H"
    return f"""/* Generated by gen_deps.py: lib{n}, {lib.summary}. Do not edit. */
#ifndef {guard}
#define {guard}

#include <stddef.h>
#include <stdint.h>

/* A digest of running every kernel of lib{n} (and of the libraries it uses) from seed. */
uint32_t {n}_digest(uint32_t seed);
/* out[i] = in[i] transformed by the kernels of lib{n}; out may equal in. */
void {n}_transform(const uint8_t *in, size_t len, uint8_t *out);
unsigned {n}_kernel_count(void);
const char *{n}_name(void);

#endif
"""


def wanted_files(files: int) -> dict[Path, str]:
    """Every file the generator produces, relative to the output directory, with its text."""
    out: dict[Path, str] = {Path("Makefile"): MAKEFILE_TEMPLATE.read_text()}
    for lib in LIBS:
        out[Path("src/include") / f"{lib.name}.h"] = header_source(lib)
        out[Path("src") / lib.name / f"{lib.name}_api.c"] = api_source(lib, files)
        for i in range(files):
            out[Path("src") / lib.name / f"{lib.name}_k{i:03d}.c"] = kernel_source(lib, i)
    return out


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds exactly that; True if written."""
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def generate(outdir: Path, files: int) -> tuple[int, int, int]:
    """Bring ``outdir`` up to date; return (files written, files unchanged, stale files removed)."""
    wanted = wanted_files(files)
    written = sum(write_if_changed(outdir / rel, text) for rel, text in sorted(wanted.items()))
    removed = 0
    src = outdir / "src"
    for path in sorted(src.rglob("*")) if src.is_dir() else []:
        if path.is_file() and path.relative_to(outdir) not in wanted:
            path.unlink()
            removed += 1
    return written, len(wanted) - written, removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("outdir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--files", type=int, default=FILES_PER_LIB, metavar="N",
                        help=f"kernel files per library (default {FILES_PER_LIB})")
    args = parser.parse_args(argv)
    if args.files < 1:
        parser.error("--files must be at least 1")
    written, unchanged, removed = generate(args.outdir, args.files)
    print(f"gen_deps: {len(LIBS)} libraries, {args.files} kernels each in {args.outdir}: "
          f"{written} written, {unchanged} unchanged, {removed} stale removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
