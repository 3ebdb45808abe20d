"""`kvctl sleep` and `kvctl wake`: free a model's memory while it idles, and bring it back.

Sleep asks the engine to drain (stop admitting work, finish or preempt what runs) and give its
pages back. With --offload the daemon keeps the KV cache in its host tier and restores it
bit-identical on wake, so the engine's prefix cache survives. A wake that needs memory waits in
line like any request; --wait shows what it is waiting for.
"""

from __future__ import annotations

import time

import click

from kvmem.cli.context import (
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    EXIT_UNKNOWN_MODEL,
    MODEL,
    KvctlContext,
    KvctlError,
    pass_context,
)

POLL_S = 0.02  # shared memory: free to read


def _wait_for_state(ctx: KvctlContext, model: str, states: tuple[str, ...], timeout: float) -> str:
    """Poll shared memory until MODEL is in one of `states`; report what a wake waits for.

    Raises:
        KvctlError: The model is gone (exit 5), `timeout` passed (exit 6), the daemon rolled a sleep
            back because the drain did not finish (exit 6), or Ctrl-C (exit 130, saying what goes on).
    """
    try:
        return _poll_state(ctx, model, states, timeout)
    except KeyboardInterrupt:
        going_on = "keeps draining: `kvctl wake` cancels the sleep" if "asleep" in states else "keeps waking"
        raise KvctlError(f"interrupted; model {model!r} {going_on}", EXIT_INTERRUPTED) from None


def _poll_state(ctx: KvctlContext, model: str, states: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last_reason = ""
    while True:
        found = ctx.read_status().model(model)
        if found is None:
            raise KvctlError(f"model {model!r} is gone", EXIT_UNKNOWN_MODEL)
        state = found.state.name.lower()
        if state in states:
            return state
        if "asleep" in states and state == "awake":  # the daemon rolled the sleep back
            raise KvctlError(f"model {model!r}: {found.waiting_for or 'woken'}; it is awake", EXIT_TIMEOUT)
        reason = found.waiting_for if state == "waking" else ""
        if reason and reason != last_reason:
            click.echo(f"{model}: waking, waiting for {reason}", err=True)
            last_reason = reason
        if time.monotonic() >= deadline:
            raise KvctlError(
                f"timed out after {timeout:g} s: model {model!r} is {state} "
                f"(holding {found.mapped_pages} pages{', waiting for ' + last_reason if last_reason else ''})",
                EXIT_TIMEOUT,
            )
        time.sleep(POLL_S)


@click.command()
@click.argument("model", type=MODEL)
@click.option("--offload", is_flag=True, help="Keep the KV cache in the daemon's host tier; wake restores it.")
@click.option("--wait", is_flag=True, help="Return once the model is asleep (its memory is back in the pool).")
@click.option("--timeout", type=click.FloatRange(0), default=60.0, show_default=True, help="Seconds --wait waits.")
@pass_context
def sleep(ctx: KvctlContext, model: str, offload: bool, wait: bool, timeout: float) -> None:
    """Put MODEL to sleep: it drains and gives its memory back (kept in host memory with --offload)."""
    state = ctx.request("sleep", model, offload)["state"]
    if wait:
        state = _wait_for_state(ctx, model, ("asleep",), timeout)
    click.echo(f"{model}: {state}", err=True)


@click.command()
@click.argument("model", type=MODEL)
@click.option("--wait", is_flag=True, help="Return once the model is awake (its cache restored).")
@click.option("--timeout", type=click.FloatRange(0), default=60.0, show_default=True, help="Seconds --wait waits.")
@pass_context
def wake(ctx: KvctlContext, model: str, wait: bool, timeout: float) -> None:
    """Wake MODEL; an offloaded cache is restored once the daemon finds the memory for it."""
    reply = ctx.request("wake", model)
    state = reply["state"]
    if state == "waking" and not wait:
        click.echo(f"{model}: waking (kvctl status shows when it is awake)", err=True)
        return
    if wait:
        state = _wait_for_state(ctx, model, ("awake", "detached"), timeout)
    click.echo(f"{model}: {state}", err=True)
