"""The ``stickyci`` command: turns ``StickyError`` into a one-line message and an exit code."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from ..errors import StickyError

# Command name → module and attribute. Modules load only when their command runs: a disk mount
# is on the path of every CI job, and should not pay for the pipeline's YAML, templates and
# schema libraries (a third of a second of start-up here).
COMMANDS = {
    "disk": ("stickyci.cli.disk", "disk"),
    "run": ("stickyci.cli.run", "run"),
    "bench": ("stickyci.cli.run", "bench"),
    "runs": ("stickyci.cli.runs", "runs"),
    "logs": ("stickyci.cli.logs", "logs"),
    "serve": ("stickyci.cli.serve", "serve"),
    "token": ("stickyci.cli.serve", "token"),
    "nix": ("stickyci.cli.nix", "nix"),
    "plan": ("stickyci.cli.plan", "plan"),
    "export": ("stickyci.cli.export", "export"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        if name == "run":
            # The run's disk helper (an interpreter importing the disks layer) starts before
            # the runner's own imports, which take longer: it is ready by the first mount.
            from ..pipeline import diskclient

            diskclient.prestart()
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"stickyci: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:  # log.exception: a bug, whose traceback is what gets it fixed
            line += "\n" + self.formatException(record.exc_info)
        return line


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stickyci")
@click.option("-v", "--verbose", is_flag=True, help="Also print informational messages.")
def cli(verbose: bool) -> None:
    """Sticky disks and a content-addressed store for CI that starts warm."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log = logging.getLogger("stickyci")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)



def main() -> None:
    """Entry point of the console script."""
    try:
        cli.main(standalone_mode=False)
    except StickyError as exc:
        click.echo(f"stickyci: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("stickyci: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # A missing file or argument is as much a one-line error as any other.
        where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx else ""
        message = exc.format_message().rstrip(".")
        click.echo(f"stickyci: error: {message}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("stickyci: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        name = f" {exc.filename}" if exc.filename else ""
        click.echo(f"stickyci: error:{name}: {exc.strerror or exc}", err=True)
        sys.exit(1)
