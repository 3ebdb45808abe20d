"""Where a daemon lives: its runtime directory, socket, lock file and shared-memory name.

One daemon serves one GPU in one runtime directory. Names derive from both, so several daemons on
one machine (one per GPU, or many in tests) never collide.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

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
