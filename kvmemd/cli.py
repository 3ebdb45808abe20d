"""The `kvmemd` command line. `start`/`stop` arrive with the daemon; for now: help and version."""

from __future__ import annotations

import click

from kvmem import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmemd")
def main() -> None:
    """kvmemd: owns one GPU's KV-cache memory as physical pages and lends them to engines."""
