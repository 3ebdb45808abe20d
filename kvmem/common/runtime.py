"""Where a daemon lives: its runtime directory, socket, lock file and shared-memory name.

One daemon serves one GPU in one runtime directory. Names derive from both, so several daemons on
one machine (one per GPU, or many in tests) never collide.
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
