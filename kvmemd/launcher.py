"""Bringing a daemon up and down: runtime directory, lock file, device, socket, status segment.

Start-up takes each step in order and undoes the ones done if a later one fails; shutdown undoes
them all in reverse. The lock file (``gpu<N>.lock``, flock'ed, holding the pid) makes the daemon
the only one for its GPU and runtime directory; whatever socket or status segment it finds there
was left by a daemon that died, and is replaced.

One daemon per physical GPU. A runtime directory is no identity: root's ``/run/kvmem`` and a
user's ``/tmp/kvmem-<uid>`` would each hold a lock for "GPU 0" and promise its memory twice. A GPU
daemon also binds an abstract Unix socket named after the GPU's UUID (`gpu_lock_name`): the kernel
lets one socket hold a name, drops it when the process dies however it dies, and the name is the
same for every user and directory in the network namespace. (Containers with their own network
namespace do not see each other's names: run GPU daemons in the host's network namespace.)
Host-memory daemons have no GPU to guard and may run side by side.

The device is what the operator asked for: ``--device cuda`` (the default) fails when the GPU is
not usable, it never turns into host memory; ``--device host`` serves host memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import resource
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import posix_ipc
import psutil

from kvmem.common.runtime import DaemonPaths
from kvmem.common.sizes import format_size, parse_size
from kvmem.common.status import StatusWriter
from kvmem.device import Device, DeviceError, open_device
from kvmemd.daemon import Daemon, DaemonConfig, install_signal_handlers
from kvmemd.metrics import MetricsServer, fleet_labels

logger = logging.getLogger(__name__)


class StartError(Exception):
    """The daemon cannot start; the message says why and what to do."""


# What a daemon may serve; no "auto": a GPU problem must not quietly become host memory.
DAEMON_DEVICE_KINDS = ("cuda", "host")


def gpu_lock_name(uuid: str) -> bytes:
    """The abstract-namespace socket name that the daemon of GPU `uuid` holds (leading NUL)."""
    return b"\0kvmemd-gpu-" + uuid.encode()


@dataclass
class StartOptions:
    gpu: int = 0
    device: str = "cuda"
    budget: str | None = None  # a size, a percentage of device memory, or None: 90% of free
    page_size: str | None = None  # None: the device's granularity
    runtime_dir: str | None = None
    group: str | None = None
    reserve_low: int = 8
    reserve_high: int = 32
    release_after: float = 10.0
    drain_timeout: float = 30.0
    host_capacity: int | None = None
    host_tier: str = "50%"  # a size or a percentage of the machine's RAM
    metrics_port: int | None = None  # None: no metrics server
    metrics_address: str = "127.0.0.1"
    node_name: str | None = None  # the `node` label of every metric (None: no such label)


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


def lock_holder_pid(paths: DaemonPaths) -> int | None:
    """The pid, in this process's PID namespace, of the process holding `paths`' lock, from /proc/locks;
    None if no lock is held or its holder is not visible here.

    The pid in the lock file is the daemon's own view of itself: in a container with a PID namespace
    of its own that is 1, which on the host is init. /proc/locks names the holder as the reader's
    namespace sees it (Linux translates it; a holder outside that namespace is not shown or shown as
    0), as "N: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> ..." with major and minor in hex.
    """
    try:
        st = os.stat(paths.lock)
        with open("/proc/locks") as locks:
            lines = locks.readlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device and fields[4].isdigit():
            pid = int(fields[4])
            return pid if pid > 0 else None
    return None


def remove_stale_files(paths: DaemonPaths) -> list[str]:
    """Remove what a daemon killed without cleaning up left in `paths`; what was removed.

    Only while no daemon holds the lock (taken here for the duration, so a daemon starting now
    waits for nothing and finds nothing half-removed): the socket, the status segment, the
    by-uuid links to the socket and the lock file itself.
    """
    try:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError as exc:
        raise StartError(f"cannot open the lock file {paths.lock}: {exc.strerror}") from None
    removed = []
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []  # a daemon runs: nothing here is stale
        if paths.socket.exists():
            for link in paths.runtime_dir.glob("by-uuid/*.sock"):
                with contextlib.suppress(OSError):
                    if os.readlink(link) == f"../{paths.socket.name}":
                        link.unlink()
            paths.socket.unlink()
            removed.append(f"socket {paths.socket}")
        try:
            posix_ipc.unlink_shared_memory(paths.shm_name)
            removed.append(f"status segment {paths.shm_name}")
        except posix_ipc.ExistentialError:
            pass  # none left
        if fd is not None:
            paths.lock.unlink()
            removed.append(f"lock file {paths.lock}")
    except OSError as exc:
        raise StartError(f"cannot remove what a dead kvmemd left in {paths.runtime_dir}: {exc.strerror}") from None
    finally:
        if fd is not None:
            os.close(fd)
    return removed


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
    try:
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as exc:  # a read-only file system, or a directory the kernel will not let us change
        raise StartError(f"cannot set the permissions of runtime directory {path}: {exc.strerror}") from None
    yield


@contextlib.contextmanager
def _lock(paths: DaemonPaths) -> Iterator[None]:
    try:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StartError(f"cannot open the lock file {paths.lock}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # The file is the running daemon's: leave it as it is (unlinking it would let a third
        # start take a lock on a new file and run beside the first daemon).
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartError(
            f"kvmemd is already running for GPU {paths.gpu} in {paths.runtime_dir} (pid {pid}); "
            "stop it with `kvmemd stop` or use another --runtime-dir"
        ) from None
    try:
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
def _gpu_lock(device: Device) -> Iterator[None]:
    """Hold the machine-wide name of `device`'s GPU for as long as the daemon runs."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(gpu_lock_name(device.uuid))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise StartError(f"cannot take GPU {device.uuid}'s lock: {exc.strerror}") from None
            holder = _lock_holder(device.uuid)
            raise StartError(
                f"GPU {device.ordinal} ({device.uuid}) is already served by kvmemd{holder}, maybe in another "
                "runtime directory: stop that daemon first (kvmemd stop --runtime-dir DIR), or use its socket"
            ) from None
        sock.listen(1)  # never accepted: listening only lets a refused start learn the holder's pid
        yield
    finally:
        sock.close()


def _lock_holder(uuid: str) -> str:
    """`` pid N`` for the process holding GPU `uuid`'s name, from SO_PEERCRED ("" if unknown)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(gpu_lock_name(uuid))
        pid, _, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return f" pid {pid}"
    except OSError:
        return ""
    finally:
        probe.close()


@contextlib.contextmanager
def _uuid_link(paths: DaemonPaths, uuid: str) -> Iterator[None]:
    """``by-uuid/<uuid>.sock`` -> our socket, for engines that know their GPU by UUID only."""
    link = paths.uuid_link(uuid)
    try:
        link.parent.mkdir(mode=0o755, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # Relative, so that it holds wherever the runtime directory is mounted (a container's volume).
        os.symlink(f"../{paths.socket.name}", tmp)
        os.replace(tmp, link)  # a link left by a dead daemon of this GPU is replaced: we hold the GPU
    except OSError as exc:
        raise StartError(f"cannot link {link} to the socket: {exc.strerror}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.readlink(link) == f"../{paths.socket.name}":
                os.unlink(link)


def notify_service_manager(state: str) -> None:
    """Tell systemd `state` (e.g. ``READY=1``) when it asked to be told: a ``Type=notify`` unit.

    The protocol is sd_notify(3)'s: one datagram of newline-separated assignments to the Unix socket
    that $NOTIFY_SOCKET names, an abstract one if the name starts with ``@``. Without the variable
    there is no one to tell; a failure to tell is logged (systemd then times the start out).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(target)
            sock.sendall(state.encode())
        except OSError as exc:
            logger.warning("cannot notify the service manager at %s: %s", address, exc.strerror)


def _open_device(options: StartOptions) -> Device:
    try:
        return open_device(options.device, options.gpu, host_capacity=options.host_capacity)
    except DeviceError as exc:
        if options.device == "cuda":
            raise StartError(
                f"GPU {options.gpu} is not usable: {exc}. To serve host memory instead, start with --device host"
            ) from None
        raise StartError(f"cannot open the device: {exc}") from None


@contextlib.contextmanager
def _listener(paths: DaemonPaths, mode: int, gid: int | None) -> Iterator[socket.socket]:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.socket)  # we hold the lock: a socket file here is a dead daemon's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(paths.socket))
        except OSError as exc:
            raise StartError(f"cannot create the socket {paths.socket}: {exc.strerror}") from None
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
        raise StartError(
            f"--page-size {text} ({size} bytes) is not a multiple of the device's granularity, "
            f"{format_size(device.granularity)} ({device.granularity} bytes)"
        )
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
        device = _open_device(options)
        stack.callback(device.close)
        if device.uuid is not None:
            stack.enter_context(_gpu_lock(device))
        page_size = _page_size(device, options.page_size)
        budget_pages = _budget_pages(device, options.budget, page_size)
        host_tier_bytes = _host_tier_bytes(options.host_tier)
        status = StatusWriter(paths.shm_name, mode=mode & 0o640, gid=gid)
        stack.callback(status.close)
        listener = stack.enter_context(_listener(paths, mode, gid))
        if device.uuid is not None:
            stack.enter_context(_uuid_link(paths, device.uuid))
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
            drain_timeout=options.drain_timeout,
        )
        try:
            daemon = Daemon(config, device, listener, status)
        except (DeviceError, ValueError) as exc:
            raise StartError(f"cannot set up the page pool: {exc}") from exc
        install_signal_handlers(daemon)
        if options.metrics_port is not None:
            try:
                labels = fleet_labels(options.gpu, device.uuid, options.node_name)
                metrics = MetricsServer(paths.shm_name, options.metrics_port, labels, options.metrics_address)
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
        # systemd's `systemctl start kvmemd@N` returns once the daemon serves, or fails with it.
        notify_service_manager(f"READY=1\nSTATUS=serving GPU {options.gpu} ({device.kind}) at {paths.socket}")
        daemon.run()
        logger.info("kvmemd stopped")
