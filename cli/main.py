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
from kvmem.cli.policy import forget, limit, minimum, priority
from kvmem.cli.sleep import sleep, wake
from kvmem.cli.status import status, top
from kvmem.common.command_line import OneLineGroup
from kvmem.common.runtime import RUNTIME_DIR_ENV

EPILOG = (
    "Exit codes: 0 success, 1 refused by the daemon (or a doctor check failed), 2 bad usage, "
    "3 no daemon for this GPU, 4 not permitted, 5 no such model, 6 timed out (or a drain rolled back), "
    "130 interrupted."
)


GLOBAL_OPTIONS = ("--gpu", "--runtime-dir")


class KvctlGroup(OneLineGroup):
    """kvctl's root group: the global options are accepted after the command too (`kvctl status --gpu 1`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))


def hoist_global_options(args: list[str]) -> list[str]:
    """`args` with every --gpu/--runtime-dir (and its value) moved in front of the command.

    Nothing after a ``--`` moves: there everything is an argument.

    Raises:
        click.UsageError: A global option ends the line without its value.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg in GLOBAL_OPTIONS:
            if i + 1 == len(args):
                raise click.UsageError(f"Option '{arg}' requires an argument.")
            front.extend(args[i : i + 2])
            i += 2
            continue
        if arg.startswith(tuple(f"{o}=" for o in GLOBAL_OPTIONS)):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


@click.group(
    cls=KvctlGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG
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


for command in (status, top, limit, minimum, priority, forget, sleep, wake, doctor, device):
    main.add_command(command)
