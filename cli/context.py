"""What every kvctl command shares: which daemon it talks to, how it reads status, and its exit codes.

Exit codes (also in `kvctl --help`):
    0  success
    1  the daemon refused the operation (the message says why)
    2  bad usage: an unknown option, a bad size or number
    3  no daemon answers for this GPU and runtime directory
    4  not permitted: the model belongs to another user
    5  no such model
    6  timed out waiting (--wait / --timeout), or the daemon rolled back a drain that did not finish
    130  interrupted (Ctrl-C); the message says what goes on without kvctl
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import psutil

from kvmem.common.errors import ControlError, DaemonPermissionError, DaemonUnavailableError
from kvmem.common.protocol import check_model_name
from kvmem.common.runtime import DaemonPaths
from kvmem.common.sizes import parse_size
from kvmem.common.status import StatusError, StatusReader, StatusSnapshot
from kvmem.control import ControlClient

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
EXIT_NOT_PERMITTED = 4
EXIT_UNKNOWN_MODEL = 5
EXIT_TIMEOUT = 6
EXIT_INTERRUPTED = 130

# A process that started this long after the daemon's recorded start is not the daemon (a reused pid).
START_TIME_SLACK_S = 2.0

_EXIT_FOR_CODE = {"not_permitted": EXIT_NOT_PERMITTED, "unknown_model": EXIT_UNKNOWN_MODEL, "timeout": EXIT_TIMEOUT}


class KvctlError(click.ClickException):
    """A one-line error on stderr and a documented exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class KvctlContext:
    """The daemon kvctl talks to (the root group's --gpu and --runtime-dir)."""

    gpu: int
    runtime_dir: str | None

    @property
    def paths(self) -> DaemonPaths:
        return DaemonPaths.resolve(self.runtime_dir, self.gpu)

    def _no_daemon(self, why: str) -> KvctlError:
        return KvctlError(
            f"no kvmemd for GPU {self.gpu} in {self.paths.runtime_dir} ({why}): start one with "
            f"`kvmemd start --gpu {self.gpu}`",
            EXIT_NO_DAEMON,
        )

    def read_status(self) -> StatusSnapshot:
        """A snapshot of the daemon's shared-memory status (no socket round trip).

        Raises:
            KvctlError: No daemon runs for this GPU (exit 3), or its status is unreadable.
        """
        try:
            with StatusReader(self.paths.shm_name) as reader:
                snapshot = reader.snapshot()
        except StatusError as exc:
            if "no status segment" in str(exc):
                raise self._no_daemon("no status in shared memory") from None
            if "no permission" in str(exc):
                raise KvctlError(f"not permitted: {exc}", EXIT_NOT_PERMITTED) from None
            raise KvctlError(f"cannot read kvmemd's status: {exc}") from None
        if not daemon_alive(snapshot.daemon.daemon_pid, snapshot.daemon.started_unix):
            raise self._no_daemon(
                f"kvmemd pid {snapshot.daemon.daemon_pid} died without cleaning up; its socket and status segment "
                "are stale, `kvmemd stop` removes them"
            )
        return snapshot

    def budget_bytes(self) -> int:
        """The daemon's budget in bytes (what percentages of sizes are taken of), from its status."""
        daemon = self.read_status().daemon
        return daemon.budget_pages * daemon.page_size

    def control(self) -> ControlClient:
        """A control connection to the daemon.

        Raises:
            KvctlError: No daemon answers (exit 3).
        """
        try:
            return ControlClient(gpu=self.gpu, runtime_dir=self.runtime_dir)
        except DaemonPermissionError as exc:
            raise KvctlError(f"not permitted: {exc}", EXIT_NOT_PERMITTED) from None
        except DaemonUnavailableError as exc:
            raise self._no_daemon(str(exc).split(":")[0]) from None

    def request(self, op: str, model: str, *args: object) -> dict:
        """Run one ControlClient method; a refusal becomes a KvctlError with its exit code."""
        with self.control() as control:
            try:
                return getattr(control, op)(model, *args)
            except ControlError as exc:
                raise KvctlError(str(exc), _EXIT_FOR_CODE.get(exc.code, EXIT_REFUSED)) from None


pass_context = click.make_pass_decorator(KvctlContext)


class ModelNameType(click.ParamType):
    """A model name as the daemon accepts it; anything else is bad usage (exit 2), before any request."""

    name = "model"

    def convert(self, value: str, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_model_name(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


MODEL = ModelNameType()


def daemon_alive(pid: int, started_unix: float) -> bool:
    """Whether the daemon that published a status still runs: its pid exists and is the same process.

    The pid is checked at once, not the heartbeat's age: a daemon killed with SIGKILL leaves a
    status that looks fresh for a while, and its pid may be reused by a process started later.
    """
    try:
        return psutil.Process(pid).create_time() <= started_unix + START_TIME_SLACK_S
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return True  # another user's process: it exists, and we cannot tell more


def parse_size_option(text: str, budget_bytes: int, option: str) -> int:
    """Bytes for a size argument; percentages are of the daemon's budget. Bad input exits 2."""
    try:
        return parse_size(text, total=budget_bytes)
    except ValueError as exc:
        raise KvctlError(f"{option}: {exc}", EXIT_USAGE) from None
