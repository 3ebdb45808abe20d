"""`kvctl status` and `kvctl top`: the daemon and its models, read from shared memory.

Both read the daemon's status segment (`kvmem.common.status`), so they cost the daemon nothing and work
while it is busy. `status --json` prints the document described by docs/kvctl-status.schema.json
(`"schema": "kvmem.common.status/1"`; fields are only ever added within a schema version).
"""

from __future__ import annotations

import json
import os
import select
import sys
import termios
import time
import tty
from typing import Any

import click

from kvmem.cli.context import KvctlContext, KvctlError, pass_context
from kvmem.common.sizes import format_size
from kvmem.common.status import StatusSnapshot

STATUS_SCHEMA = "kvmem.common.status/1"


def status_document(ctx: KvctlContext, snap: StatusSnapshot) -> dict[str, Any]:
    """The `status --json` document (schema `STATUS_SCHEMA`)."""
    d = snap.daemon
    page = d.page_size

    def pages(n: int) -> int | None:
        return None if n < 0 else n

    def size(n: int) -> int | None:
        return None if n < 0 else n * page

    return {
        "schema": STATUS_SCHEMA,
        "gpu": ctx.gpu,
        "runtime_dir": str(ctx.paths.runtime_dir),
        "daemon": {
            "pid": d.daemon_pid,
            "device_kind": d.device_kind,
            "device_name": d.device_name,
            "page_size": page,
            "budget_pages": d.budget_pages,
            "budget_bytes": d.budget_pages * page,
            "pages_created": d.pages_created,
            "pages_free": d.pages_free,
            "pages_free_clean": d.pages_free_clean,
            "pages_granted": d.pages_granted,
            "pages_quarantined": d.pages_quarantined,
            "reserve_low_pages": d.reserve_low_pages,
            "reserve_high_pages": d.reserve_high_pages,
            "host_tier_used_bytes": d.host_tier_used_bytes,
            "host_tier_capacity_bytes": d.host_tier_capacity_bytes,
            "grants": d.grants,
            "denies": d.denies,
            "reclaims": d.reclaims,
            "sleeps": d.sleeps,
            "wakes": d.wakes,
            "started_unix": d.started_unix,
            "heartbeat_age_s": round(snap.heartbeat_age(), 3),
        },
        "models": [
            {
                "model": m.model,
                "state": m.state.name.lower(),
                "pid": m.pid or None,
                "uid": m.uid,
                "limit_pages": pages(m.limit_pages),
                "limit_bytes": size(m.limit_pages),
                "min_pages": m.min_pages,
                "min_bytes": m.min_pages * page,
                "priority": m.priority,
                "mapped_pages": m.mapped_pages,
                "mapped_bytes": m.mapped_pages * page,
                "used_pages": m.used_pages,
                "used_bytes": m.used_pages * page,
                "target_pages": pages(m.target_pages),
                "saved_pages": m.saved_pages,
                "saved_bytes": m.saved_pages * page,
                "grants": m.grants,
                "denies": m.denies,
                "reclaims": m.reclaims,
                "sleeps": m.sleeps,
                "wakes": m.wakes,
                "pages_granted_total": m.pages_granted_total,
                "pages_returned_total": m.pages_returned_total,
                "last_grant_us": m.last_grant_us,
                "waiting_for": m.waiting_for,
            }
            for m in snap.models
        ],
    }


COLUMNS = ("MODEL", "PID", "STATE", "LIMIT", "MIN", "PRIO", "MAPPED", "USED", "TARGET", "SAVED")


def status_table(snap: StatusSnapshot) -> str:
    """The human-readable status: two lines on the daemon, then one row per model."""
    d = snap.daemon
    page = d.page_size

    def size(n: int, none: str = "-") -> str:
        return none if n < 0 else format_size(n * page)

    lines = [
        f"kvmemd pid {d.daemon_pid} · GPU {d.gpu} · {d.device_kind} ({d.device_name}) · pages of {format_size(page)}",
        f"budget {size(d.budget_pages)} ({d.budget_pages} pages): created {d.pages_created} · free {d.pages_free} "
        f"(clean {d.pages_free_clean}, reserve {d.reserve_low_pages}-{d.reserve_high_pages}) · "
        f"granted {d.pages_granted} · quarantined {d.pages_quarantined} · "
        f"host tier {format_size(d.host_tier_used_bytes)} of {format_size(d.host_tier_capacity_bytes)}",
    ]
    rows = [COLUMNS]
    for m in snap.models:
        rows.append(
            (
                m.model,
                str(m.pid) if m.pid else "-",
                m.state.name.lower(),
                size(m.limit_pages, "none"),
                size(m.min_pages) if m.min_pages else "-",
                str(m.priority),
                size(m.mapped_pages),
                size(m.used_pages),
                size(m.target_pages),
                size(m.saved_pages) if m.saved_pages else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines.append("")
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    if not snap.models:
        lines.append("(no models yet)")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help=f"Print JSON (schema {STATUS_SCHEMA}) instead of a table.")
@pass_context
def status(ctx: KvctlContext, as_json: bool) -> None:
    """Show the daemon (device, budget, pages) and each model (pid, state, limit, minimum, priority,
    mapped, in use, target, saved). Reads shared memory: no request reaches the daemon."""
    snap = ctx.read_status()
    if as_json:
        click.echo(json.dumps(status_document(ctx, snap), indent=2))
    else:
        click.echo(status_table(snap))


# ANSI: alternate screen, hide the cursor, home + clear to the end; restored on exit.
_ENTER, _LEAVE, _REDRAW = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l", "\x1b[H\x1b[J"


@click.command()
@click.option(
    "--interval", type=click.FloatRange(0.05), default=0.5, show_default=True, help="Seconds between refreshes."
)
@click.option("--iterations", type=click.IntRange(1), help="Stop after this many refreshes (for scripts).")
@pass_context
def top(ctx: KvctlContext, interval: float, iterations: int | None) -> None:
    """Live view of `status`, refreshed in place. Quit with q or Ctrl-C. Works over ssh (plain ANSI)."""
    interactive = sys.stdin.isatty()
    saved_tty = termios.tcgetattr(sys.stdin) if interactive else None
    out = sys.stdout
    out.write(_ENTER if out.isatty() else "")
    try:
        if saved_tty is not None:
            tty.setcbreak(sys.stdin)  # keys arrive one at a time, unechoed; Ctrl-C still interrupts
        count = 0
        while iterations is None or count < iterations:
            count += 1
            try:
                body = status_table(ctx.read_status())
            except KvctlError as exc:
                body = f"waiting for kvmemd: {exc.message}"
            stamp = time.strftime("%H:%M:%S")
            out.write(f"{_REDRAW if out.isatty() else ''}{body}\n\n{stamp} · every {interval:g} s · q quits\n")
            out.flush()
            if _quit_pressed(interactive, interval):
                break
    except KeyboardInterrupt:
        pass  # Ctrl-C is the other way out
    finally:
        if saved_tty is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved_tty)
        out.write(_LEAVE if out.isatty() else "")
        out.flush()


def _quit_pressed(interactive: bool, timeout: float) -> bool:
    """Wait up to `timeout` seconds for a key; True if it was q (or stdin closed)."""
    if not interactive:
        time.sleep(timeout)
        return False
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        return False
    key = os.read(sys.stdin.fileno(), 1)
    return key in (b"q", b"Q", b"")
