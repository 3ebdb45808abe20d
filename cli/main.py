"""The `kvctl` entry point: the root group, its global options and the command groups.

Exit codes: 0 success; 1 the daemon refused (or a doctor check failed); 2 bad usage; 3 no daemon
for this GPU; 4 not permitted; 5 no such model; 6 timed out. Data goes to stdout, messages to
stderr.
"""

from __future__ import annotations

import click

from kvmem import __version__
from kvmem.cli.context import KvctlContext
from kvmem.cli.device import device
from kvmem.cli.doctor import doctor
from kvmem.cli.policy import limit, minimum, priority
from kvmem.cli.sleep import sleep, wake
from kvmem.cli.status import status, top
from kvmem.common.command_line import OneLineGroup
from kvmem.common.runtime import RUNTIME_DIR_ENV

EPILOG = (
    "Exit codes: 0 success, 1 refused by the daemon (or a doctor check failed), 2 bad usage, "
    "3 no daemon for this GPU, 4 not permitted, 5 no such model, 6 timed out."
)


@click.group(
    cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG
)
@click.version_option(__version__, prog_name="kvctl")
@click.option(
    "--gpu", type=click.IntRange(0), default=0, show_default=True, envvar="KVMEM_GPU", show_envvar=True,
    help="GPU whose daemon to talk to.",
)  # fmt: skip
@click.option(
    "--runtime-dir", type=click.Path(file_okay=False, readable=False), envvar=RUNTIME_DIR_ENV, show_envvar=True,
    help="The daemon's runtime directory. Default: /run/kvmem for root, else $XDG_RUNTIME_DIR/kvmem, "
    "else /tmp/kvmem-<uid>.",
)  # fmt: skip
@click.pass_context
def main(click_ctx: click.Context, gpu: int, runtime_dir: str | None) -> None:
    """kvctl: inspect and drive kvmem, elastic KV-cache memory shared by LLM engines."""
    click_ctx.obj = KvctlContext(gpu=gpu, runtime_dir=runtime_dir)


for command in (status, top, limit, minimum, priority, sleep, wake, doctor, device):
    main.add_command(command)
