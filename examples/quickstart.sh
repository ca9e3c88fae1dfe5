#!/usr/bin/env bash
# The main job in miniature: a cold job fills a disk and commits it; the next job mounts it warm.
set -euo pipefail
# The README installs into the repository's .venv, which is not on PATH: use it if it is there.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x "$repo/.venv/bin/stickyci" ]]; then
  stickyci=$repo/.venv/bin/stickyci
elif command -v stickyci >/dev/null; then
  stickyci=$(command -v stickyci)
else
  echo "quickstart.sh: stickyci is neither in $repo/.venv nor on PATH; install it first:" \
    "python3 -m venv .venv && .venv/bin/pip install -e ." >&2
  exit 127
fi
work=$(mktemp -d)
trap '"$stickyci" disk unmount "$work/ws" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
key="quickstart-$(date +%s)-$$"

echo "== job 1: cold; build the dependencies and commit them"
"$stickyci" disk mount "$key" "$work/ws"
mkdir -p "$work/ws/deps"
for i in $(seq 1 200); do
  printf 'int dep_%d(void) { return %d; }\n' "$i" "$i" > "$work/ws/deps/dep_$i.c"
done
if command -v cc >/dev/null; then
  cc -c -o "$work/ws/deps/dep_1.o" "$work/ws/deps/dep_1.c"
fi
"$stickyci" disk commit "$work/ws"

echo "== job 2: warm; the dependencies are already there, one file changes"
"$stickyci" disk mount "$key" "$work/ws"
ls "$work/ws/deps" | wc -l | xargs echo "files on the warm disk:"
echo "// service change" >> "$work/ws/deps/dep_7.c"
"$stickyci" disk commit "$work/ws"

echo "== what changed between the two generations"
"$stickyci" disk diff "$key"
"$stickyci" disk show "$key"
"$stickyci" disk rm "$key"
