"""What `kvmemd` and `kvctl` share as command lines: every error is one line and a documented exit code.

click prints a usage error as three lines (usage, a hint, the error) and lets an unexpected
exception out as a traceback. `OneLineGroup` prints ``Error: <message>`` on stderr and exits with
the error's code instead: 2 for bad usage (click's own), the command's codes for the rest, and 1
with the exception's type and text for anything that escaped a command (a bug, or a system error
no command anticipated). ``KVMEM_TRACEBACK=1`` lets such an exception out with its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

EXIT_USAGE = 2


class OneLineGroup(click.Group):
    """A click group whose errors are one line on stderr (see the module docstring)."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> NoReturn:  # type: ignore[override]
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare `kvctl`: the help, as bad usage
            click.echo(exc.ctx.get_help())
            sys.exit(EXIT_USAGE)
        except click.Abort:
            # Ctrl-C (or EOF at a prompt): commands that leave something running say so themselves.
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"Error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:
            if os.environ.get("KVMEM_TRACEBACK") == "1":
                raise
            detail = str(exc) or "no detail"
            click.echo(f"Error: {type(exc).__name__}: {one_line(detail)} (KVMEM_TRACEBACK=1 shows where)", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def one_line(text: str) -> str:
    """`text` with its line breaks folded, so that an error is always one line."""
    return " ".join(text.split())
