"""Bringing a daemon up and down: runtime directory, lock file, device, socket, status segment.

Start-up takes each step in order and undoes the ones done if a later one fails; shutdown undoes
them all in reverse. The lock file (``gpu<N>.lock``, flock'ed, holding the pid) makes the daemon
the only one for its GPU and runtime directory; whatever socket or status segment it finds there
was left by a daemon that died, and is replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from kvmem.common.runtime import DaemonPaths
from kvmem.common.sizes import format_size, parse_size
from kvmem.common.status import StatusWriter
from kvmem.device import Device, DeviceError, open_device
from kvmemd.daemon import Daemon, DaemonConfig, install_signal_handlers
from kvmemd.metrics import MetricsServer

logger = logging.getLogger(__name__)


class StartError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass
class StartOptions:
    gpu: int = 0
    device: str = "auto"
    budget: str | None = None  # a size, a percentage of device memory, or None: 90% of free
    page_size: str | None = None  # None: the device's granularity
    runtime_dir: str | None = None
    group: str | None = None
    reserve_low: int = 8
    reserve_high: int = 32
    release_after: float = 10.0
    host_capacity: int | None = None
    host_tier: str = "50%"  # a size or a percentage of the machine's RAM
    metrics_port: int | None = None  # None: no metrics server
    metrics_address: str = "127.0.0.1"


def read_lock_pid(paths: DaemonPaths) -> int | None:
    """The pid of the daemon holding the lock for `paths`, or None if none holds it."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def _runtime_dir(path: Path, gid: int | None) -> Iterator[None]:
    mode = 0o750 if gid is not None else 0o700
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartError(f"cannot create runtime directory {path}: {exc.strerror}") from exc
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise StartError(f"runtime directory {path} belongs to uid {st.st_uid}, not you: use --runtime-dir")
    if st.st_mode & stat.S_IWOTH:
        raise StartError(f"runtime directory {path} is world-writable: use a private --runtime-dir")
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, -1, gid)
    yield


@contextlib.contextmanager
def _lock(paths: DaemonPaths) -> Iterator[None]:
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StartError(
                f"kvmemd is already running for GPU {paths.gpu} in {paths.runtime_dir} (pid {pid}); "
                "stop it with `kvmemd stop` or use another --runtime-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Unlink while still holding the lock, so no one can take a lock on a file about to vanish.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(paths.lock)):
                os.unlink(paths.lock)
        os.close(fd)


@contextlib.contextmanager
def _listener(paths: DaemonPaths, mode: int, gid: int | None) -> Iterator[socket.socket]:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.socket)  # we hold the lock: a socket file here is a dead daemon's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(paths.socket))
        finally:
            os.umask(old_umask)
        os.chmod(paths.socket, mode)
        if gid is not None:
            os.chown(paths.socket, -1, gid)
        sock.listen(128)
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.socket)


def _budget_pages(device: Device, budget: str | None, page_size: int) -> int:
    info = device.memory_info()
    if budget is None:
        budget_bytes = int(info.free * 0.9)
    else:
        try:
            budget_bytes = parse_size(budget, total=info.total)
        except ValueError as exc:
            raise StartError(f"--budget: {exc}") from None
    if budget_bytes > info.total:
        raise StartError(f"--budget {format_size(budget_bytes)} exceeds the device's {format_size(info.total)}")
    pages = budget_bytes // page_size
    if pages < 1:
        raise StartError(f"--budget {format_size(budget_bytes)} is less than one {format_size(page_size)} page")
    if budget_bytes > info.free:
        logger.warning(
            "budget %s exceeds the %s free now: pages beyond it wait for memory",
            format_size(budget_bytes),
            format_size(info.free),
        )
    return pages


def _host_tier_bytes(text: str) -> int:
    try:
        return parse_size(text, total=psutil.virtual_memory().total)
    except ValueError as exc:
        raise StartError(f"--host-tier: {exc}") from None


def _page_size(device: Device, text: str | None) -> int:
    if text is None:
        return device.granularity
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise StartError(f"--page-size: {exc}") from None
    if size <= 0 or size % device.granularity:
        raise StartError(f"--page-size {text} is not a multiple of the device's granularity {device.granularity}")
    return size


def _raise_fd_limit(budget_pages: int) -> bool:
    """Raise the soft fd limit to the hard one; True if one kept descriptor per page fits.

    The pool keeps each page's exported descriptor so grants need no export call; with a budget
    too large for the limit it exports per grant instead.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    fits = soft == resource.RLIM_INFINITY or budget_pages + 4096 <= soft
    if not fits:
        logger.info("fd limit %d is too low to keep one descriptor per page: exporting per grant", soft)
    return fits


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartError(f"--group {group!r} is not a group on this machine") from None


def run_daemon(options: StartOptions, ready: Callable[[int], object] | None = None) -> None:
    """Start, serve until SIGTERM/SIGINT, and clean up. Calls `ready(pid)` once serving.

    Raises:
        StartError: Something prevents start-up; nothing is left behind.
    """
    paths = DaemonPaths.resolve(options.runtime_dir, options.gpu)
    gid = _group_id(options.group)
    mode = 0o660 if gid is not None else 0o600
    with contextlib.ExitStack() as stack:
        stack.enter_context(_runtime_dir(paths.runtime_dir, gid))
        stack.enter_context(_lock(paths))
        try:
            device = open_device(options.device, options.gpu, host_capacity=options.host_capacity)
        except DeviceError as exc:
            raise StartError(f"cannot open the device: {exc}") from exc
        stack.callback(device.close)
        page_size = _page_size(device, options.page_size)
        budget_pages = _budget_pages(device, options.budget, page_size)
        host_tier_bytes = _host_tier_bytes(options.host_tier)
        status = StatusWriter(paths.shm_name, mode=mode & 0o640, gid=gid)
        stack.callback(status.close)
        listener = stack.enter_context(_listener(paths, mode, gid))
        cache_exports = _raise_fd_limit(budget_pages)
        config = DaemonConfig(
            gpu=options.gpu,
            budget_pages=budget_pages,
            page_size=page_size,
            reserve_low=options.reserve_low,
            reserve_high=options.reserve_high,
            release_after=options.release_after,
            cache_exports=cache_exports,
            host_tier_bytes=host_tier_bytes,
        )
        try:
            daemon = Daemon(config, device, listener, status)
        except (DeviceError, ValueError) as exc:
            raise StartError(f"cannot set up the page pool: {exc}") from exc
        install_signal_handlers(daemon)
        if options.metrics_port is not None:
            try:
                metrics = MetricsServer(paths.shm_name, options.metrics_port, options.metrics_address)
            except OSError as exc:
                raise StartError(
                    f"--metrics-port {options.metrics_port}: cannot listen on {options.metrics_address}: {exc.strerror}"
                ) from None
            stack.callback(metrics.close)
            daemon.observe_grant_latency = metrics.grant_latency.observe
            logger.info("metrics at http://%s:%d/metrics", options.metrics_address, metrics.port)
        logger.info(
            "kvmemd serving GPU %d (%s, %s): budget %d pages of %s = %s, socket %s",
            options.gpu,
            device.kind,
            device.name,
            budget_pages,
            format_size(page_size),
            format_size(budget_pages * page_size),
            paths.socket,
        )
        if ready is not None:
            ready(os.getpid())
        daemon.run()
        logger.info("kvmemd stopped")
