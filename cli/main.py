"""The `kvctl` entry point: the root group and its global options.

Exit codes: 0 success; 1 the operation failed (message on stderr); 2 bad usage (click's).
"""

from __future__ import annotations

import click

from kvmem import __version__
from kvmem.cli.device import device


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvctl")
def main() -> None:
    """kvctl: inspect and drive kvmem, elastic KV-cache memory shared by LLM engines."""


main.add_command(device)
