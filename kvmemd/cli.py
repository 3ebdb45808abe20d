"""The `kvmemd` command line: `kvmemd start` and `kvmemd stop`.

Exit codes: 0 success; 1 the daemon could not start or stop (the reason on stderr); 2 bad usage.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import click

from kvmem import __version__
from kvmem.common.command_line import OneLineGroup
from kvmem.common.runtime import RUNTIME_DIR_ENV, DaemonPaths
from kvmem.common.sizes import parse_size
from kvmemd.launcher import (
    DAEMON_DEVICE_KINDS,
    StartError,
    StartOptions,
    lock_holder_pid,
    read_lock_pid,
    remove_stale_files,
    run_daemon,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class SizeText(click.ParamType):
    """A size as operators write it (20GB, 64GiB, 512M; with `percent`, also 80%), checked at parse time
    so that a typo is bad usage (exit 2); the text is kept, since a percentage is resolved at start-up."""

    name = "size"

    def __init__(self, percent: bool):
        self.percent = percent

    def convert(self, value: str, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            parse_size(value, total=100 if self.percent else None)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value


@click.group(
    cls=OneLineGroup, context_settings=CONTEXT, epilog="Exit codes: 0 success, 1 could not start or stop, 2 bad usage."
)
@click.version_option(__version__, prog_name="kvmemd")
def main() -> None:
    """kvmemd: owns one GPU's KV-cache memory as physical pages and lends them to engines."""


def gpu_option(f):
    return click.option(
        "--gpu", type=click.IntRange(0), default=0, show_default=True, envvar="KVMEM_GPU", show_envvar=True,
        help="GPU ordinal this daemon serves.",
    )(f)  # fmt: skip


def runtime_dir_option(f):
    return click.option(
        "--runtime-dir", type=click.Path(file_okay=False), envvar=RUNTIME_DIR_ENV, show_envvar=True,
        help="Directory for the socket and lock file. Default: /run/kvmem for root, else "
        "$XDG_RUNTIME_DIR/kvmem, else /tmp/kvmem-<uid>.",
    )(f)  # fmt: skip


@main.command()
@gpu_option
@click.option(
    "--device", type=click.Choice(DAEMON_DEVICE_KINDS), default="cuda", show_default=True, envvar="KVMEM_DEVICE",
    show_envvar=True, help="cuda: GPU --gpu, or fail if it is not usable; host: host memory, only when asked for.",
)  # fmt: skip
@click.option(
    "--budget", type=SizeText(percent=True), envvar="KVMEM_BUDGET", show_envvar=True,
    help="Most memory the daemon hands out: a size (70GB, 64GiB) or a percentage of device memory (80%). "
    "Default: 90% of the memory free at start.",
)  # fmt: skip
@click.option(
    "--page-size", type=SizeText(percent=False), envvar="KVMEM_PAGE_SIZE", show_envvar=True,
    help="Bytes per page, a multiple of the allocation granularity. Default: the granularity (2 MiB on GPUs).",
)  # fmt: skip
@runtime_dir_option
@click.option(
    "--group", envvar="KVMEM_GROUP", show_envvar=True,
    help="Group whose members may attach besides the owner (socket 0660, status 0640).",
)  # fmt: skip
@click.option(
    "--reserve", "reserve", nargs=2, type=click.IntRange(0), default=(8, 32), show_default=True,
    envvar="KVMEM_RESERVE", show_envvar=True,
    help="Low and high watermarks of the warm reserve of free pages: a floor, raised to the attached engines' "
    "growth unit (low one, high two), to the largest GROW of the last --release-after seconds (low it, high twice) "
    "and, while an attached engine has not grown by more than a unit, to its first burst (16 units, within its limit).",
)  # fmt: skip
@click.option(
    "--release-after", type=click.FloatRange(0), default=10.0, show_default=True, envvar="KVMEM_RELEASE_AFTER",
    show_envvar=True, help="Seconds free pages must stay above the high watermark before the surplus is released, "
    "and that a GROW keeps the reserve raised to its size.",
)  # fmt: skip
@click.option(
    "--drain-timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
    envvar="KVMEM_DRAIN_TIMEOUT", show_envvar=True,
    help="Seconds an engine has to drain for `kvctl sleep`; a drain not done by then is rolled back to awake.",
)  # fmt: skip
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True,
    envvar="KVMEM_LOG_LEVEL", show_envvar=True, help="How much the daemon logs (to stderr; with --detach, to "
    "<runtime dir>/gpu<N>.log).",
)  # fmt: skip
@click.option(
    "--host-tier", type=SizeText(percent=True), envvar="KVMEM_HOST_TIER", show_envvar=True, default="50%",
    show_default=True,
    help="Most host memory that sleeping models' caches (kvctl sleep --offload) may fill: a size (64GiB) or "
    "a percentage of the machine's RAM.",
)  # fmt: skip
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), envvar="KVMEM_METRICS_PORT", show_envvar=True,
    help="Serve Prometheus metrics over HTTP on this port (0: any free port, logged). Default: no metrics.",
)  # fmt: skip
@click.option(
    "--metrics-address", default="127.0.0.1", show_default=True, envvar="KVMEM_METRICS_ADDRESS", show_envvar=True,
    help="Address the metrics server listens on.",
)  # fmt: skip
@click.option(
    "--node-name", envvar="KVMEM_NODE_NAME", show_envvar=True,
    help="The machine's name in a fleet, a `node` label on every metric (e.g. Kubernetes' spec.nodeName). "
    "Default: no such label.",
)  # fmt: skip
@click.option("--detach", is_flag=True, help="Run in the background; return once the daemon serves.")
def start(
    gpu: int,
    device: str,
    budget: str | None,
    page_size: str | None,
    runtime_dir: str | None,
    group: str | None,
    reserve: tuple[int, int],
    release_after: float,
    drain_timeout: float,
    host_tier: str,
    metrics_port: int | None,
    metrics_address: str,
    node_name: str | None,
    log_level: str,
    detach: bool,
) -> None:
    """Start the daemon for one GPU (in the foreground unless --detach)."""
    low, high = reserve
    if low > high:
        raise click.UsageError(f"--reserve {low} {high}: the low watermark must not exceed the high one")
    options = StartOptions(
        gpu=gpu,
        device=device,
        budget=budget,
        page_size=page_size,
        runtime_dir=runtime_dir,
        group=group,
        reserve_low=low,
        reserve_high=high,
        release_after=release_after,
        drain_timeout=drain_timeout,
        host_tier=host_tier,
        metrics_port=metrics_port,
        metrics_address=metrics_address,
        node_name=node_name or None,
    )
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s kvmemd[%(process)d] %(levelname)s %(message)s", stream=sys.stderr
    )
    if detach:
        _start_detached(options)
        return
    try:
        run_daemon(options)
    except StartError as exc:
        raise click.ClickException(str(exc)) from None


def _start_detached(options: StartOptions) -> None:
    """Double-fork; the grandchild serves and reports through a pipe once it is ready (or failed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        log_path = DaemonPaths.resolve(options.runtime_dir, options.gpu).runtime_dir / f"gpu{options.gpu}.log"
        code = 0
        try:
            try:
                log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError as exc:
                raise StartError(f"cannot open the log file {log_path}: {exc.strerror}") from None
            os.dup2(log_fd, 2)
            run_daemon(options, ready=lambda pid: os.write(write_end, f"ok {pid}\n".encode()))
        except StartError as exc:
            os.write(write_end, f"error {exc}\n".encode())
            code = 1
        except OSError as exc:  # no step anticipated it: still one line for the operator
            os.write(write_end, f"error {exc.strerror or exc}\n".encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as reader:
        line = reader.readline().strip()
    if line.startswith("ok "):
        click.echo(f"kvmemd started for GPU {options.gpu} (pid {line[3:]})", err=True)
        return
    raise click.ClickException(line[6:] if line.startswith("error ") else "kvmemd exited during start-up")


@main.command()
@gpu_option
@runtime_dir_option
@click.option("--timeout", type=click.FloatRange(0), default=30.0, show_default=True, help="Seconds to wait.")
def stop(gpu: int, runtime_dir: str | None, timeout: float) -> None:
    """Stop the daemon for one GPU (SIGTERM: clients are told, socket and status are removed)."""
    paths = DaemonPaths.resolve(runtime_dir, gpu)
    pid = read_lock_pid(paths)
    if pid is None:
        try:
            removed = remove_stale_files(paths)
        except StartError as exc:
            raise click.ClickException(str(exc)) from None
        if not removed:
            raise click.ClickException(f"no kvmemd is running for GPU {gpu} in {paths.runtime_dir}")
        click.echo(
            f"no kvmemd was running for GPU {gpu} in {paths.runtime_dir}; removed what a dead one left: "
            + ", ".join(removed),
            err=True,
        )
        return
    if pid <= 0:
        raise click.ClickException(f"the lock file {paths.lock} holds no pid; stop the daemon by hand")
    # Signal the holder as this PID namespace sees it: the file's pid is the daemon's own view, which
    # in a container of its own is 1 (here: init).
    holder = lock_holder_pid(paths)
    if holder is None:
        if read_lock_pid(paths) is None:
            click.echo(f"kvmemd for GPU {gpu} stopped meanwhile", err=True)
            return
        raise click.ClickException(
            f"kvmemd for GPU {gpu} (pid {pid} in its own PID namespace) runs where this process cannot see it: "
            "stop it where it runs (its container or pod)"
        )
    pid = holder
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise click.ClickException(f"not permitted to stop kvmemd pid {pid} (it runs as another user)") from None
    except ProcessLookupError:
        pass  # it exited in the meantime
    deadline = time.monotonic() + timeout
    while read_lock_pid(paths) is not None:
        if time.monotonic() > deadline:
            raise click.ClickException(f"kvmemd pid {pid} did not stop within {timeout:g} s")
        time.sleep(0.05)
    click.echo(f"kvmemd for GPU {gpu} stopped (pid {pid})", err=True)
