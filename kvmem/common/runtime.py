"""Where a daemon lives: its runtime directory, socket, lock file and shared-memory name.

One daemon serves one GPU in one runtime directory. Names derive from both, so several daemons on
one machine (one per GPU, or many in tests) never collide. The GPU in a name is the ordinal the
daemon was started with (``kvmemd start --gpu N``), which is what an operator types.

An engine cannot trust an ordinal: CUDA_VISIBLE_DEVICES renumbers GPUs from 0 in every process
(a container that sees only the host's GPU 3 calls it ``cuda:0``). A GPU daemon therefore also
names its socket by the GPU's UUID, ``by-uuid/GPU-....sock``, a symbolic link to ``gpuN.sock``;
an engine looks its GPU's UUID up there (`DaemonPaths.for_uuid`).
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from kvmem.common.errors import DaemonPermissionError, DaemonUnavailableError

RUNTIME_DIR_ENV = "KVMEM_RUNTIME_DIR"


def default_runtime_dir() -> Path:
    """``$KVMEM_RUNTIME_DIR``, else ``/run/kvmem`` for root, ``$XDG_RUNTIME_DIR/kvmem``, ``/tmp/kvmem-<uid>``."""
    if os.environ.get(RUNTIME_DIR_ENV):
        return Path(os.environ[RUNTIME_DIR_ENV])
    if os.geteuid() == 0:
        return Path("/run/kvmem")
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "kvmem"
    return Path(f"/tmp/kvmem-{os.geteuid()}")


@dataclass(frozen=True)
class DaemonPaths:
    """The files and names of the daemon for `gpu` in `runtime_dir`."""

    runtime_dir: Path
    gpu: int

    @classmethod
    def resolve(cls, runtime_dir: str | os.PathLike | None = None, gpu: int = 0) -> DaemonPaths:
        path = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
        return cls(path.absolute(), gpu)

    @classmethod
    def for_uuid(cls, runtime_dir: str | os.PathLike | None, uuid: str) -> DaemonPaths:
        """The paths of the daemon serving the GPU with this UUID, found through ``by-uuid/``.

        Raises:
            DaemonUnavailableError: No daemon serves that GPU in this runtime directory.
        """
        base = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
        link = base.absolute() / "by-uuid" / f"{uuid}.sock"
        try:
            target = os.readlink(link)
        except OSError:
            raise DaemonUnavailableError(
                f"no kvmemd serves GPU {uuid} in {base}: start one for that GPU with `kvmemd start --gpu N` "
                "(N as nvidia-smi numbers it on the host)"
            ) from None
        name = Path(target).name
        if not (name.startswith("gpu") and name.endswith(".sock") and name[3:-5].isdigit()):
            raise DaemonUnavailableError(f"{link} points to {target!r}, not to a kvmemd socket: remove it")
        return cls(base.absolute(), int(name[3:-5]))

    def uuid_link(self, uuid: str) -> Path:
        """The ``by-uuid`` link a GPU daemon makes to its socket."""
        return self.runtime_dir / "by-uuid" / f"{uuid}.sock"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / f"gpu{self.gpu}.sock"

    @property
    def lock(self) -> Path:
        return self.runtime_dir / f"gpu{self.gpu}.lock"

    @property
    def shm_name(self) -> str:
        """POSIX shared-memory name of the status segment (``/kvmem.<dir hash>.gpu<N>``)."""
        digest = hashlib.sha256(os.fsencode(self.runtime_dir)).hexdigest()[:12]
        return f"/kvmem.{digest}.gpu{self.gpu}"

    def connect(self) -> socket.socket:
        """A blocking connection to this daemon's socket (the caller sends HELLO).

        Raises:
            DaemonUnavailableError: Nothing listens there (the message says how to start a daemon).
            DaemonPermissionError: A daemon listens, but this user may not connect.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(self.socket))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonUnavailableError(
                f"no kvmemd answers at {self.socket}: start one with `kvmemd start --gpu {self.gpu}`"
            ) from None
        except PermissionError:
            sock.close()
            raise DaemonPermissionError(
                f"no permission to connect to {self.socket}: the daemon's owner can start it with --group GROUP "
                "for members of GROUP"
            ) from None
        return sock
