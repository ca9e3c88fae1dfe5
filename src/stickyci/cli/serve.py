"""``stickyci serve`` and ``stickyci token …``: the cache server and its scoped tokens."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import procs
from ..errors import BusyError, StickyError, UsageError
from ..paths import cache_home
from ..store import default_store_url
from ..units import option_duration, parse_duration, parse_size
from .output import emit, json_option

if TYPE_CHECKING:
    from ..server.config import ServerConfig


def default_state_dir() -> Path:
    """``STICKYCI_SERVER_DIR``, else ``server/`` under the stickyci cache directory."""
    explicit = os.environ.get("STICKYCI_SERVER_DIR")
    return Path(explicit) if explicit else cache_home() / "server"


def state_option(f: click.decorators.FC) -> click.decorators.FC:
    """``--state-dir DIR``: where the server keeps its tokens."""
    return click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                        help="Server state (tokens). Default: $STICKYCI_SERVER_DIR or "
                             "server/ in the stickyci cache dir.")(f)


MIN_EVICT_EVERY = 1.0
"""Shortest interval between scheduled eviction passes: each one lists every ref and runs gc."""


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:8471")
    return host.strip("[]") or "0.0.0.0", int(port)


@click.command()
@click.option("--store", "store_url", envvar="STICKYCI_STORE", metavar="URL",
              help="The store to serve (file:// or s3://).")
@click.option("--listen", default="127.0.0.1:8471", show_default=True, metavar="HOST:PORT")
@state_option
@click.option("--max-size", default=None, metavar="SIZE",
              help="Evict least-recently-used Bazel cache entries above this size (e.g. 50G).")
@click.option("--max-body", default="2G", show_default=True, metavar="SIZE",
              help="Refuse request bodies larger than this with 413.")
@click.option("--anonymous-read", is_flag=True, help="Let requests without a token read.")
@click.option("--evict-after", default=None, metavar="DURATION",
              help="Remove disks unused for this long (e.g. 7d), then gc, on a schedule.")
@click.option("--evict-every", default="1h", show_default=True, metavar="DURATION",
              help="How often eviction and gc run.")
@click.option("--gc-grace", default="1h", show_default=True, metavar="DURATION",
              help="gc spares packs younger than this (commits in flight).")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One JSON line per request on stderr.")
@click.option("--workers", default=1, show_default=True, metavar="N", type=int,
              help="Processes answering on the one port. One uses about one core: pick the "
                   "cores the server may have (e.g. 2 on a 2-core box that runs nothing "
                   "else), fewer if runners or builds share the machine.")
def serve(store_url: str | None, listen: str, state_dir: Path | None, max_size: str | None,
          max_body: str, anonymous_read: bool, evict_after: str | None, evict_every: str,
          gc_grace: str, access_log: bool, workers: int) -> None:
    """Serve a store over HTTP to many runners, and as a Bazel/ccache remote cache."""
    from ..server.config import ServerConfig
    from ..server.workers import check_workers

    host, port = _listen(listen)
    url = store_url or default_store_url()
    if url.startswith(("http://", "https://")):
        raise UsageError(f"--store {url!r}: a server serves a file:// or s3:// store, not "
                         "another server")
    cfg = ServerConfig(
        store_url=url, state_dir=state_dir or default_state_dir(),
        max_size=parse_size(max_size) if max_size else None, max_body=parse_size(max_body),
        anonymous_read=anonymous_read,
        evict_after=None if evict_after is None else option_duration("evict-after", evict_after),
        evict_every=option_duration("evict-every", evict_every, MIN_EVICT_EVERY),
        gc_grace=parse_duration(gc_grace))
    check_workers(workers)
    if workers > 1:
        from ..server import workers as supervisor

        logging.getLogger("stickyci").setLevel(logging.INFO)
        socks = _bind_workers(host, port, workers)
        click.echo(f"stickyci: serving {url} on http://{_address(host, port)} with "
                   f"{workers} workers", err=True)
        try:
            supervisor.serve(cfg, socks, access_log)
        finally:
            for sock in socks:
                sock.close()
        return
    _serve_one(cfg, host, port, access_log)


def _serve_one(cfg: ServerConfig, host: str, port: int, access_log: bool) -> None:
    """One process: the app in this one."""
    from ..server.app import create_app
    from ..server.metrics import configure_logs
    from ..server.workers import http_server

    configure_logs(access_log)
    app = create_app(cfg)
    sock = _bind(host, port)
    click.echo(f"stickyci: serving {cfg.store_url} on http://{_address(host, port)}",
               err=True)
    server = http_server(app)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C is how a foreground server is stopped
        pass
    except SystemExit as exc:  # uvicorn's own exit status 3 would read as "not found" here
        raise StickyError("the server failed to start; its error is logged above") from exc
    finally:
        sock.close()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_workers(host: str, port: int, n: int) -> list[socket.socket]:
    """A listening socket per worker, all on ``host:port`` (``SO_REUSEPORT``): the kernel
    spreads new connections over them evenly, where on one shared socket whichever worker
    wakes first takes them all. Refused when anything listens on the port already, as a plain
    bind is: another server sharing it this way would get part of the clients."""
    if _listening(port):
        who = _listener(port)
        raise BusyError(f"{_address(host, port)} is already in use{f' by {who}' if who else ''}"
                        "; stop it or pick another --listen HOST:PORT")
    socks = [_bind(host, port, reuse_port=True)]
    port = socks[0].getsockname()[1]  # the one the kernel picked, for port 0
    try:
        socks += [_bind(host, port, reuse_port=True) for _ in range(n - 1)]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket on ``host:port``, or one line saying why there cannot be one.

    Bound here rather than by uvicorn, which logs a bind failure over two lines and exits 3.
    """
    address = _address(host, port)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            who = _listener(port)
            raise BusyError(f"{address} is already in use{f' by {who}' if who else ''}; "
                            "stop it or pick another --listen HOST:PORT") from None
        why = exc.strerror or str(exc)
        raise UsageError(f"--listen {address}: cannot listen there ({why}); e.g. "
                         f"--listen 127.0.0.1:{port}") from None
    return sock


def _listening(port: int) -> set[str]:
    """The sockets (``socket:[INODE]``) listening on TCP ``port``, whoever holds them."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in itertools.islice(f, 1, None):
                fields = row.split()
                # local address "HEX_IP:HEX_PORT", state 0A is LISTEN, inode is field 9
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _listener(port: int) -> str:
    """``pid N (command)`` of a process listening on TCP ``port``, or "" if not visible."""
    inodes = _listening(port)
    for pid in procs.pids() if inodes else ():
        if not inodes.isdisjoint(procs.fd_links(pid)):
            return f"pid {pid} ({procs.command(pid)})"
    return ""


@click.group()
def token() -> None:
    """Create, list and revoke the server's scoped tokens."""


@token.command("create")
@state_option
@click.option("--name", default="", help="A note saying who the token is for.")
@click.option("--read", multiple=True, metavar="PATTERN", help="Disk keys it may read (glob).")
@click.option("--write", multiple=True, metavar="PATTERN",
              help="Disk keys it may write (glob); implies --read of the same.")
@click.option("--delete", multiple=True, metavar="PATTERN", help="Disk keys it may remove.")
@click.option("--admin", is_flag=True, help="Everything, including gc and eviction.")
@click.option("--expires", default=None, metavar="DURATION",
              help="A positive duration, e.g. 30d; default: never.")
@json_option
def token_create(state_dir: Path | None, name: str, read: tuple[str, ...],
                 write: tuple[str, ...], delete: tuple[str, ...], admin: bool,
                 expires: str | None, as_json: bool) -> None:
    """Create a token and print it; it is shown only this once."""
    from ..server.auth import TokenStore

    secret, tok = TokenStore(state_dir or default_state_dir()).create(
        name=name, read=list(read), write=list(write), delete=list(delete), admin=admin,
        ttl=None if expires is None else option_duration("expires", expires))
    if as_json:
        click.echo(json.dumps({"token": secret, **tok.public()}, indent=2))
    else:
        click.echo(secret)


@token.command("ls")
@state_option
@json_option
def token_ls(state_dir: Path | None, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    from ..server.auth import TokenStore

    tokens = TokenStore(state_dir or default_state_dir()).list()

    def text(_: object) -> str:
        return "\n".join(
            f"{t.id}  {t.name or '-'}  read={','.join(t.read) or '-'}  "
            f"write={','.join(t.write) or '-'}  delete={','.join(t.delete) or '-'}"
            f"{'  admin' if t.admin else ''}  expires={_when(t.expires)}"
            for t in tokens) or "no tokens"

    emit(as_json, [t.public() for t in tokens], text)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts)) if ts else "never"


@token.command("revoke")
@state_option
@click.argument("token_id")
def token_revoke(state_dir: Path | None, token_id: str) -> None:
    """Revoke a token by its id (the part after ``sci_``)."""
    from ..server.auth import TokenStore

    TokenStore(state_dir or default_state_dir()).revoke(token_id)
    click.echo(f"revoked {token_id}")
