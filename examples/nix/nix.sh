# Sourced by the pipeline's steps: `. nix.sh CACHE_URL CACHE_KEY`, in the job's workspace.
#
# The /nix disk is mounted at ./nix, so ./nix holds what /nix holds (store/, var/nix/db/, the
# daemon's socket) and Nix uses the workspace as a chroot store: store paths are /nix/store/…
# as on any machine, found on disk under ./nix/store. A daemon serves it on
# ./nix/var/nix/daemon-socket/socket; every client command goes through it ($NIX_STORE).
# With CACHE_URL (a stickyci server's http://HOST:PORT/nix/CACHE), the daemon substitutes from
# it (trusting CACHE_KEY) when the disk is cold, and `push` uploads there.
#
#   start_daemon        nix-daemon in the background (pid in nix-daemon.pid)
#   stop_daemon         SIGTERM, wait until it is gone, remove its socket
#   nix_build ARGS...   build a .nix file through the daemon; prints the output paths, and on stderr
#                       how many derivations it built and how many paths it fetched
#   push PATHS...       nix copy PATHS (their closures) to the cache, if there is one
#   real PATH           where a store path is on disk (under ./nix/store)
NIX_ROOT=$PWD
NIX_CACHE=${1:-}
NIX_CACHE_KEY=${2:-}
export NIX_DAEMON_SOCKET_PATH="$NIX_ROOT/nix/var/nix/daemon-socket/socket"
export HOME="$NIX_ROOT/.nix-home" XDG_CACHE_HOME="$NIX_ROOT/.nix-home/cache"
# ?root= tells the client where the store is on disk: it reads NARs there itself (nix copy).
NIX_STORE="unix://$NIX_DAEMON_SOCKET_PATH?root=$NIX_ROOT"
# Build users when the machine has them (nix-setup-systemd makes nixbld); builds run in the
# sandbox (a chroot store always does), which sees the host's sh and gcc through sandbox-paths.
nix_users=$(getent group nixbld >/dev/null && echo nixbld || true)
NIX_CONFIG="experimental-features = nix-command
build-users-group = $nix_users
sandbox-paths = /bin /lib /lib64 /usr
substituters = $NIX_CACHE
trusted-public-keys = $NIX_CACHE_KEY"
if [ -n "$NIX_CACHE" ] && [ -n "${STICKYCI_TOKEN:-}" ]; then
    # Nix sends HTTP Basic credentials from a netrc file: the runner's token as the password.
    mkdir -p "$HOME"
    host=${NIX_CACHE#*://}; host=${host%%/*}; host=${host%%:*}
    (umask 077; echo "machine $host login nix password $STICKYCI_TOKEN" > "$HOME/netrc")
    NIX_CONFIG="$NIX_CONFIG
netrc-file = $HOME/netrc"
fi
export NIX_CONFIG

start_daemon() {
    mkdir -p "$HOME"
    setsid nix-daemon --store "$NIX_ROOT" </dev/null >>nix-daemon.log 2>&1 &
    echo $! > nix-daemon.pid
    for _ in $(seq 100); do
        nix store ping --store "$NIX_STORE" >/dev/null 2>&1 && break
        sleep 0.1
    done
    nix store ping --store "$NIX_STORE" >/dev/null 2>&1 || {
        echo "nix-daemon does not answer on $NIX_DAEMON_SOCKET_PATH; its log:"
        cat nix-daemon.log
        return 1
    }
    echo "nix-daemon running as pid $(cat nix-daemon.pid), serving $NIX_ROOT/nix"
}

stop_daemon() {
    [ -s nix-daemon.pid ] || { echo "no nix-daemon to stop"; return 0; }
    pid=$(cat nix-daemon.pid)
    kill "$pid" 2>/dev/null || true
    # Gone, or a zombie (which holds no files) not reaped yet.
    while [ -e "/proc/$pid" ] && ! grep -qs '^State:[[:space:]]*Z' "/proc/$pid/status"; do
        sleep 0.1
    done
    rm -f "$NIX_DAEMON_SOCKET_PATH" nix-daemon.pid  # a socket is not stored in a snapshot
    echo "nix-daemon (pid $pid) stopped"
}

nix_build() {
    # Instantiate, then realise: nix-build through a daemon would leave a gc root on the disk
    # to a temporary result link, one more on every run.
    status=0
    { drv=$(nix-instantiate --store "$NIX_STORE" "$@") &&
      nix-store --store "$NIX_STORE" --realise "$drv"; } 2> nix-build.log || status=$?
    # Nix's advice to add a gc root is noise here: warm-deps keeps one on the disk.
    grep -v "you did not specify '--add-root'" nix-build.log >&2 || true
    echo "derivations built: $(grep -c "^building '" nix-build.log || true)," \
         "paths fetched: $(grep -c "^copying path '" nix-build.log || true)" >&2
    return $status
}

push() {
    if [ -z "$NIX_CACHE" ]; then
        echo "no binary cache (vars.cache is empty): nothing pushed"
        return 0
    fi
    nix copy --store "$NIX_STORE" --to "$NIX_CACHE?compression=zstd" "$@"
    echo "pushed $# path(s) and their closures to $NIX_CACHE"
}

real() {
    echo "$NIX_ROOT/nix/${1#/nix/}"
}
