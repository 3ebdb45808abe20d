"""`kvctl doctor`: is this machine ready for kvmem, and if not, what to do.

Each check prints ok, warn or FAIL with what it found and, when not ok, the fix. The exit code is
1 if any check fails (warnings do not fail: host memory works without a GPU).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from kvmem.cli.context import EXIT_REFUSED, KvctlContext, KvctlError, daemon_alive, pass_context
from kvmem.common.sizes import format_size
from kvmem.common.status import SEGMENT_SIZE, StatusError, StatusReader
from kvmem.device import DeviceError

SHM_DIR = Path("/dev/shm")
STALE_FIX = "a daemon died without cleaning up: `kvmemd stop` removes what it left, `kvmemd start` replaces it"
SHM_FREE_WANTED = 64 << 20  # kvmem needs only its status segment, but engines and torch use /dev/shm too
FD_HEADROOM = 4096  # descriptors beyond one per page: sockets, libraries, the engine's own files


@dataclass
class Check:
    check: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


def check_driver(gpu: int) -> Check:
    from kvmem.device.cuda import CudaDevice

    try:
        with CudaDevice(gpu) as device:
            return Check("driver", "ok", f"CUDA driver loads; GPU {gpu} ({device.name}) supports VMM")
    except DeviceError as exc:
        return Check(
            "driver",
            "warn",
            f"no usable GPU: {exc}; kvmemd serves host memory only with --device host",
            "for GPUs: install the NVIDIA driver (CUDA 12 or 13) and check `nvidia-smi` lists the GPU",
        )


def check_daemon(ctx: KvctlContext) -> tuple[Check, dict | None]:
    try:
        with ctx.control() as control:
            reply = control.status()
    except KvctlError as exc:
        fix = f"kvmemd start --gpu {ctx.gpu} --detach (or: systemctl start kvmemd@{ctx.gpu})"
        return Check("daemon", "fail", exc.message, fix), None
    daemon = reply["daemon"]
    return Check("daemon", "ok", f"kvmemd pid {daemon['daemon_pid']} answers at {ctx.paths.socket}"), daemon


def _access_fix(path: Path) -> str:
    return (
        f"{path} belongs to uid {path.stat().st_uid}: run as that user, or have the daemon started with "
        "--group GROUP and join that group"
    )


def check_socket(ctx: KvctlContext) -> Check:
    path = ctx.paths.socket
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check("socket", "fail", f"{path} does not exist", f"start kvmemd for GPU {ctx.gpu}")
    except PermissionError:  # the runtime directory itself is closed to this user
        return Check(
            "socket", "fail", f"{path.parent} is not open to you (uid {os.geteuid()})", _access_fix(path.parent)
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return Check(
            "socket", "fail", f"{path} is {mode:o}: anyone may connect", "restart kvmemd (it makes it 0600/0660)"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("socket", "fail", f"{path} is {mode:o} and not open to you", _access_fix(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return Check("socket", "fail", f"{path} is stale: no daemon listens on it", STALE_FIX)
    except OSError:
        pass  # not for us to judge here: the daemon check reports why it cannot connect
    finally:
        probe.close()
    return Check("socket", "ok", f"{path} is {mode:o}, open to you")


def check_status_segment(ctx: KvctlContext) -> Check:
    path = SHM_DIR / ctx.paths.shm_name.lstrip("/")
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check("status", "fail", f"{path} does not exist", f"start kvmemd for GPU {ctx.gpu}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return Check("status", "fail", f"{path} is {mode:o}: others may write it", "restart kvmemd")
    if not os.access(path, os.R_OK):
        return Check("status", "fail", f"{path} is {mode:o} and not readable by you", _access_fix(path))
    if st.st_size < SEGMENT_SIZE:
        return Check("status", "fail", f"{path} is {st.st_size} bytes, not {SEGMENT_SIZE}", "restart kvmemd")
    try:
        with StatusReader(ctx.paths.shm_name) as reader:
            daemon = reader.snapshot().daemon
    except StatusError as exc:
        return Check("status", "fail", f"{path} cannot be read: {exc}", "restart kvmemd")
    if not daemon_alive(daemon.daemon_pid, daemon.started_unix):
        return Check("status", "fail", f"{path} is stale: kvmemd pid {daemon.daemon_pid} is gone", STALE_FIX)
    return Check("status", "ok", f"{path} is {mode:o}, readable")


def check_shm_space() -> Check:
    try:
        free = shutil.disk_usage(SHM_DIR).free
    except OSError as exc:
        return Check("shm", "fail", f"{SHM_DIR} is not usable: {exc}", "mount a tmpfs at /dev/shm")
    fix = "enlarge it: `mount -o remount,size=1G /dev/shm`, or `docker run --shm-size=1g`"
    if free < SEGMENT_SIZE:  # not even room for one daemon's status
        return Check("shm", "fail", f"{SHM_DIR} has {format_size(free)} free: no room for kvmemd's status", fix)
    if free < SHM_FREE_WANTED:
        return Check(
            "shm", "warn", f"{SHM_DIR} has {format_size(free)} free, less than {format_size(SHM_FREE_WANTED)}", fix
        )
    return Check("shm", "ok", f"{SHM_DIR} has {format_size(free)} free")


def check_fd_limit(daemon: dict | None) -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    pages = daemon["budget_pages"] if daemon else 0
    wanted = pages + FD_HEADROOM
    shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        return Check(
            "fd-limit",
            "fail",
            f"open files limited to {shown}; an engine may hold one descriptor per page ({pages} pages) "
            f"plus {FD_HEADROOM}",
            f"`ulimit -n {min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted}` before starting "
            f"engines (LimitNOFILE={wanted} in a systemd unit)",
        )
    return Check("fd-limit", "ok", f"open files limited to {shown} (enough for {pages} pages + {FD_HEADROOM})")


CHECKS = ("driver", "daemon", "socket", "status", "shm", "fd-limit")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option(
    "--check", "only", type=click.Choice(CHECKS), multiple=True,
    help="Run only this check (repeatable), e.g. `--check daemon` for a liveness probe. Default: all.",
)  # fmt: skip
@pass_context
def doctor(ctx: KvctlContext, as_json: bool, only: tuple[str, ...]) -> None:
    """Check the driver and VMM support, the daemon, socket and shared-memory permissions, /dev/shm
    space and the open-files limit; print the fix for each failure. Exit 1 if a check fails."""
    wanted = set(only or CHECKS)
    daemon_check, daemon = check_daemon(ctx) if wanted & {"daemon", "fd-limit"} else (None, None)
    checks = [
        check()
        for name, check in (
            ("driver", lambda: check_driver(ctx.gpu)),
            ("daemon", lambda: daemon_check),
            ("socket", lambda: check_socket(ctx)),
            ("status", lambda: check_status_segment(ctx)),
            ("shm", check_shm_space),
            ("fd-limit", lambda: check_fd_limit(daemon)),
        )
        if name in wanted
    ]
    if as_json:
        click.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(f"{c.status.upper() if c.status == 'fail' else c.status:4}  {c.check}: {c.detail}")
            if c.fix:
                click.echo(f"      fix: {c.fix}")
    failed = [c.check for c in checks if c.status == "fail"]
    if failed:
        raise KvctlError(f"{len(failed)} check(s) failed: {', '.join(failed)}", EXIT_REFUSED)
