# Sourced by the compile steps: `. remote-cache.sh URL`. When URL (the pipeline's `cache` var)
# names a stickyci server and ccache is installed, compile through ccache with that server as its
# only cache (Bazel layout; the runner's STICKYCI_TOKEN as bearer token). A disk that is cold or
# was evicted then costs downloads of compiled objects, not a rebuild from source.
# Sets CC for make; `remote_cache_report` prints the hits and writes of this step.
CC=cc
if [ -n "${1:-}" ]; then
  if command -v ccache >/dev/null; then
    export CCACHE_DIR="$PWD/.ccache" CCACHE_REMOTE_ONLY=true CCACHE_BASEDIR="$PWD"
    export CCACHE_REMOTE_STORAGE="$1|layout=bazel${STICKYCI_TOKEN:+|bearer-token=$STICKYCI_TOKEN}"
    CC="ccache cc"
    ccache --zero-stats >/dev/null
  else
    echo "remote cache $1 not used: ccache is not installed"
  fi
fi

remote_cache_report() {
  [ "$CC" = cc ] && return 0
  ccache --print-stats | awk -F '\t' '
    $1 == "remote_storage_read_hit" { hits = $2 }
    $1 == "remote_storage_write" { writes = $2 }
    END { printf "remote cache: %d hits, %d writes\n", hits, writes }'
}
