"""Real ccache (Debian's, 4.7) against a real ``stickyci serve`` as its Bazel-layout remote cache.

A small C program (``MODULES`` translation units and a shared header, built by make) is
compiled with ``CC="ccache gcc"``, each build with a fresh, empty local ccache directory, so
every hit the second build gets came from the server. The counts come from
``ccache --print-stats``; the server's own view comes from its ``/metrics``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server import Server, start_server

MODULES = 24
pytestmark = pytest.mark.skipif(shutil.which("ccache") is None,
                                reason="ccache is not installed (apt-get install ccache)")


HEADER = """\
#ifndef LIB_H
#define LIB_H
#include <stdint.h>
#include <stddef.h>
#define SCALE {scale}
{decls}
#endif
"""

MODULE = """\
#include "lib.h"

/* A little real work per unit, so the objects differ and the optimiser has something to do. */
static uint32_t mix_{i}(uint32_t h, uint32_t v) {{
    h ^= v + 0x9e3779b9u + (h << 6) + (h >> 2);
    return h * {mult}u;
}}

uint32_t unit_{i}(const char *s, size_t n) {{
    uint32_t h = {i}u * SCALE;
    for (size_t k = 0; k < n; k++) {{
        h = mix_{i}(h, (uint8_t)s[k]);
    }}
    return h;
}}
"""

MAIN = """\
#include <stdio.h>
#include <string.h>
#include "lib.h"

typedef uint32_t (*unit_fn)(const char *, size_t);
static const unit_fn units[] = {{ {fns} }};

int main(int argc, char **argv) {{
    const char *text = argc > 1 ? argv[1] : "stickyci";
    uint32_t sum = 0;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {{
        sum = sum * 31u + units[i](text, strlen(text));
    }}
    printf("%08x x%d\\n", (unsigned)sum, SCALE);
    return 0;
}}
"""

MAKEFILE = """\
CC ?= cc
LINK ?= cc
CFLAGS := -O2 -Wall -Iinclude
SRCS := $(wildcard src/*.c)
OBJS := $(SRCS:.c=.o)

app: $(OBJS)
\t$(LINK) -o $@ $(OBJS)

src/%.o: src/%.c include/lib.h
\t$(CC) $(CFLAGS) -c $< -o $@

clean:
\trm -f app $(OBJS)
"""


def write_codebase(root: Path, scale: int = 3) -> None:
    """MODULES units and a main, all including one header whose SCALE changes every unit."""
    (root / "include").mkdir(parents=True, exist_ok=True)
    (root / "src").mkdir(exist_ok=True)
    decls = "\n".join(f"uint32_t unit_{i}(const char *s, size_t n);" for i in range(MODULES))
    (root / "include" / "lib.h").write_text(HEADER.format(scale=scale, decls=decls))
    for i in range(MODULES):
        (root / "src" / f"unit_{i:02}.c").write_text(MODULE.format(i=i, mult=2 * i + 16777619))
    fns = ", ".join(f"unit_{i}" for i in range(MODULES))
    (root / "src" / "main.c").write_text(MAIN.format(fns=fns))
    (root / "Makefile").write_text(MAKEFILE)


COMPILATIONS = MODULES + 1  # the units and main.c; the link does not go through ccache


@dataclass
class Build:
    """One build's ccache counters and what its program printed."""

    stats: dict[str, int]
    output: str


@dataclass
class Rig:
    """A server, a codebase, and a place for local ccache directories and config."""

    server: Server
    code: Path
    work: Path
    builds: int = 0

    def build(self, remote_storage: str) -> Build:
        """``make`` from clean with a new, empty CCACHE_DIR; the build must succeed."""
        self.builds += 1
        ccache_dir = self.work / f"ccache-{self.builds}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CCACHE_") and k not in ("MAKEFLAGS", "MFLAGS")}
        config = self.work / "ccache.conf"
        config.touch()  # empty, and it stops ccache reading the system's config
        env.update(CCACHE_CONFIGPATH=str(config), CCACHE_DIR=str(ccache_dir),
                   CCACHE_REMOTE_STORAGE=remote_storage)
        subprocess.run(["make", "-s", "clean"], cwd=self.code, env=env, check=True)
        make = subprocess.run(["make", "-s", "-j2", "CC=ccache gcc", "LINK=gcc"],
                              cwd=self.code, env=env, capture_output=True, text=True)
        assert make.returncode == 0, f"make failed:\n{make.stdout}\n{make.stderr}"
        out = subprocess.run([str(self.code / "app")], capture_output=True, text=True,
                             check=True).stdout.strip()
        printed = subprocess.run(["ccache", "--print-stats"], env=env, capture_output=True,
                                 text=True, check=True).stdout
        stats = {}
        for line in printed.splitlines():
            key, _, value = line.partition("\t")
            stats[key] = int(value)
        return Build(stats, out)

    def url(self, token: str | None = None, instance: str = "",
            form: str = "basic") -> str:
        """A ccache ``remote_storage`` value for this server (the two auth forms 4.7 has)."""
        host = self.server.url.removeprefix("http://")
        path = f"/{instance}" if instance else ""
        if token is None:
            return f"http://{host}{path}|layout=bazel"
        if form == "basic":  # ccache sends Authorization: Basic base64(user:token)
            return f"http://ccache:{token}@{host}{path}|layout=bazel"
        return f"http://{host}{path}|layout=bazel|bearer-token={token}"

    def requests(self, method: str, status: int) -> float:
        """How many ``method`` requests to the AC the server answered with ``status``."""
        with self.server.client() as c:
            text = c.get("/metrics").raise_for_status().text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "stickyci_requests_total" and s.labels["route"] == "ac"
                   and s.labels["method"] == method and s.labels["status"] == str(status))

    def stored(self, instance: str = "default") -> int:
        """AC entries the server holds for ``instance``."""
        ac = Path(self.server.store_url.removeprefix("file://")) / "ac"
        return len(list(ac.glob(f"{instance}.*")))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("ccache")
    code = root / "code"
    write_codebase(code)
    with start_server(root / "server") as srv:
        yield Rig(srv, code, root)


@pytest.fixture(scope="module")
def first(rig: Rig) -> Build:
    """The first build against an empty server, with a token that may write ``default``."""
    build = rig.build(rig.url(rig.server.token("--write", "default")))
    assert build.stats["cache_miss"] == COMPILATIONS
    assert build.stats["remote_storage_error"] == 0
    return build


def test_second_build_is_served_by_the_remote_cache(rig: Rig, first: Build) -> None:
    # The first build missed everywhere and stored every result on the server.
    assert first.stats["remote_storage_miss"] == COMPILATIONS
    assert first.stats["remote_storage_write"] >= COMPILATIONS
    assert rig.stored() >= COMPILATIONS

    second = rig.build(rig.url(rig.server.token("--write", "default")))
    assert second.stats["remote_storage_hit"] == COMPILATIONS
    assert second.stats["local_storage_hit"] == 0  # its local cache started empty
    assert second.stats["cache_miss"] == 0
    assert second.stats["remote_storage_error"] == 0
    assert second.output == first.output  # objects from the cache link into the same program


def test_read_only_token_gets_hits_and_its_writes_are_refused(rig: Rig, first: Build) -> None:
    token = rig.server.token("--read", "default")
    hit = rig.build(rig.url(token, form="bearer"))
    assert hit.stats["remote_storage_hit"] == COMPILATIONS
    assert hit.stats["remote_storage_error"] == 0
    assert hit.output == first.output

    # A changed header misses every unit; ccache's uploads are refused, the build is not.
    stored, refused = rig.stored(), rig.requests("PUT", 403)
    write_codebase(rig.code, scale=5)
    try:
        changed = rig.build(rig.url(token, form="bearer"))
    finally:
        write_codebase(rig.code)
    assert changed.stats["cache_miss"] == COMPILATIONS
    assert changed.stats["remote_storage_hit"] == 0
    assert changed.stats["remote_storage_error"] == COMPILATIONS
    assert rig.requests("PUT", 403) - refused == COMPILATIONS
    assert rig.stored() == stored
    assert changed.output != first.output


def test_instance_prefix_keeps_ccache_entries_apart(rig: Rig, first: Build) -> None:
    token = rig.server.token("--write", "team-*")
    team = rig.build(rig.url(token, instance="team-a"))
    # The results exist on the server under "default", not under "team-a".
    assert team.stats["remote_storage_hit"] == 0
    assert team.stats["remote_storage_write"] >= COMPILATIONS
    assert rig.stored("team-a") >= COMPILATIONS
    again = rig.build(rig.url(token, instance="team-a"))
    assert again.stats["remote_storage_hit"] == COMPILATIONS
    # Without credentials the server answers 401; ccache reports errors and still builds.
    anon = rig.build(rig.url(None, instance="team-a"))
    assert anon.stats["remote_storage_hit"] == 0
    assert anon.stats["remote_storage_error"] == COMPILATIONS
    assert anon.output == first.output
