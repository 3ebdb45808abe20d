"""`kvctl device`: what the device layer sees on this machine."""

from __future__ import annotations

import json

import click

from kvmem.cli.context import KvctlContext, pass_context
from kvmem.device import DEVICE_KINDS, DeviceError, open_device


@click.command()
@click.option(
    "--device", "kind", type=click.Choice(DEVICE_KINDS), default="auto", show_default=True,
    envvar="KVMEM_DEVICE", show_envvar=True, help="Which device layer to open.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_context
def device(ctx: KvctlContext, kind: str, as_json: bool) -> None:
    """Show the device kvmem would use for --gpu: kind, name, allocation granularity, memory."""
    try:
        with open_device(kind, ctx.gpu) as dev:
            info = dev.memory_info()
            data = {
                "kind": dev.kind,
                "ordinal": dev.ordinal,
                "name": dev.name,
                "granularity": dev.granularity,
                "free_bytes": info.free,
                "total_bytes": info.total,
            }
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(data))
        return
    for key, value in data.items():
        click.echo(f"{key:12} {value}")
