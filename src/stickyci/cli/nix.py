"""``stickyci nix key …``: the signing keys of the server's Nix binary caches."""

from __future__ import annotations

from pathlib import Path

import click

from .serve import default_state_dir, state_option


@click.group()
def nix() -> None:
    """The server's Nix binary caches (http://HOST:PORT/nix/CACHE)."""


@nix.group()
def key() -> None:
    """A cache's ed25519 signing key; Nix trusts its public half (trusted-public-keys)."""


@key.command("generate")
@state_option
@click.argument("cache")
def key_generate(state_dir: Path | None, cache: str) -> None:
    """Make CACHE's key unless it has one, and print its public key.

    The server also makes one on the cache's first upload."""
    from ..server.nix import KeyRing

    click.echo(KeyRing(state_dir or default_state_dir()).ensure(cache).public)


@key.command("show")
@state_option
@click.argument("cache")
def key_show(state_dir: Path | None, cache: str) -> None:
    """Print CACHE's public key, for Nix's trusted-public-keys."""
    from ..server.nix import KeyRing

    click.echo(KeyRing(state_dir or default_state_dir()).require(cache).public)


@key.command("rotate")
@state_option
@click.argument("cache")
def key_rotate(state_dir: Path | None, cache: str) -> None:
    """Replace CACHE's key and print the new public key.

    The server signs every narinfo as it serves it, so from its next request on it signs
    with the new key only: clients that trust just the old one stop substituting from CACHE
    until their trusted-public-keys has the new one."""
    from ..server.nix import KeyRing

    click.echo(KeyRing(state_dir or default_state_dir()).rotate(cache).public)
