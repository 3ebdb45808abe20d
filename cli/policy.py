"""`kvctl limit`, `kvctl min`, `kvctl priority`: a model's share of the daemon's budget.

A model that is not attached yet may be given a policy; it applies when its engine attaches.
Sizes are bytes as operators write them (20GB, 20GiB, 512M) or a percentage of the daemon's
budget (25%). The daemon sends the new policy to the engine at once; a lowered limit also asks the
engine for the pages over it.
"""

from __future__ import annotations

import click

from kvmem.cli.context import KvctlContext, parse_size_option, pass_context
from kvmem.common.sizes import format_size

NO_LIMIT = ("none", "unlimited", "off")


@click.command()
@click.argument("model")
@click.argument("size")
@pass_context
def limit(ctx: KvctlContext, model: str, size: str) -> None:
    """Cap MODEL at SIZE (20GB, 20GiB, 512M, 25% of the budget; `none` removes the cap)."""
    limit_bytes = None if size.lower() in NO_LIMIT else parse_size_option(size, ctx.budget_bytes(), "SIZE")
    ctx.request("set_limit", model, limit_bytes)
    shown = "no limit" if limit_bytes is None else f"limit {format_size(limit_bytes)}"
    click.echo(f"{model}: {shown}", err=True)


@click.command(name="min")
@click.argument("model")
@click.argument("size")
@pass_context
def minimum(ctx: KvctlContext, model: str, size: str) -> None:
    """Guarantee MODEL at least SIZE: it is never asked for pages below it and is served first."""
    min_bytes = parse_size_option(size, ctx.budget_bytes(), "SIZE")
    ctx.request("set_min", model, min_bytes)
    click.echo(f"{model}: minimum {format_size(min_bytes)}", err=True)


@click.command(context_settings={"ignore_unknown_options": True})  # so that `priority m -3` is a value
@click.argument("model")
@click.argument("value", type=click.IntRange(-(2**31), 2**31 - 1))
@pass_context
def priority(ctx: KvctlContext, model: str, value: int) -> None:
    """Set MODEL's priority: higher is served first and asked for pages last (default 0)."""
    ctx.request("set_priority", model, value)
    click.echo(f"{model}: priority {value}", err=True)
