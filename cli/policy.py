"""`kvctl limit`, `kvctl min`, `kvctl priority`, `kvctl forget`: a model's share of the daemon's budget.

A model that is not attached yet may be given a policy; it applies when its engine attaches.
Sizes are bytes as operators write them (20GB, 20GiB, 512M) or a percentage of the daemon's
budget (25%), counted in whole pages (a limit rounds down, a minimum up; the message says what
was set). The daemon sends the new policy to the engine at once, whose target then says how many
pages it may keep.
"""

from __future__ import annotations

import click

from kvmem.cli.context import EXIT_USAGE, MODEL, KvctlContext, KvctlError, parse_size_option, pass_context
from kvmem.common.sizes import format_size
from kvmem.common.status import ModelState

NO_LIMIT = ("none", "unlimited", "off")


# ignore_unknown_options: a negative SIZE ("-1GB") is read as a (bad) size, not as an unknown option.
@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("model", type=MODEL)
@click.argument("size")
@pass_context
def limit(ctx: KvctlContext, model: str, size: str) -> None:
    """Cap MODEL at SIZE (20GB, 20GiB, 512M, 25% of the budget; `none` removes the cap).

    The daemon counts whole pages: the cap is SIZE rounded down to pages, at least one page.
    """
    daemon = ctx.read_status().daemon
    page, budget = daemon.page_size, daemon.budget_pages * daemon.page_size
    limit_bytes = None if size.lower() in NO_LIMIT else parse_size_option(size, budget, "SIZE")
    if limit_bytes is not None and limit_bytes < page:
        raise KvctlError(
            f"SIZE: {format_size(limit_bytes)} is less than one {format_size(page)} page, so {model} could hold "
            f"nothing: to free its memory, `kvctl sleep {model}`",
            EXIT_USAGE,
        )
    ctx.request("set_limit", model, limit_bytes)
    if limit_bytes is None:
        click.echo(f"{model}: no limit", err=True)
    else:
        pages = limit_bytes // page
        click.echo(f"{model}: limit {format_size(pages * page)} ({pages} pages)", err=True)
        if limit_bytes > budget:
            click.echo(f"note: that is more than the daemon's whole budget, {format_size(budget)}", err=True)
    _say_if_detached(ctx, model)


@click.command(name="min", context_settings={"ignore_unknown_options": True})
@click.argument("model", type=MODEL)
@click.argument("size")
@pass_context
def minimum(ctx: KvctlContext, model: str, size: str) -> None:
    """Guarantee MODEL at least SIZE (rounded up to whole pages): it is never asked for pages below it
    and is served first."""
    daemon = ctx.read_status().daemon
    page = daemon.page_size
    min_bytes = parse_size_option(size, daemon.budget_pages * page, "SIZE")
    ctx.request("set_min", model, min_bytes)
    pages = -(-min_bytes // page)
    click.echo(f"{model}: minimum {format_size(pages * page)} ({pages} pages)", err=True)
    _say_if_detached(ctx, model)


@click.command()
@click.argument("model", type=MODEL)
@pass_context
def forget(ctx: KvctlContext, model: str) -> None:
    """Drop MODEL's policy (limit, minimum, priority) while no engine has it attached."""
    ctx.request("forget", model)
    click.echo(f"{model}: forgotten", err=True)


def _say_if_detached(ctx: KvctlContext, model: str) -> None:
    """A policy for a model no engine has attached is kept for it: say so (a typo shows here)."""
    record = ctx.read_status().model(model)
    if record is None or record.state == ModelState.DETACHED:
        click.echo(
            f"note: {model} is not attached; the policy applies when an engine attaches it "
            f"(`kvctl forget {model}` drops it)",
            err=True,
        )


@click.command(context_settings={"ignore_unknown_options": True})  # so that `priority m -3` is a value
@click.argument("model", type=MODEL)
@click.argument("value", type=click.IntRange(-(2**31), 2**31 - 1))
@pass_context
def priority(ctx: KvctlContext, model: str, value: int) -> None:
    """Set MODEL's priority: higher is served first and asked for pages last (default 0)."""
    ctx.request("set_priority", model, value)
    click.echo(f"{model}: priority {value}", err=True)
