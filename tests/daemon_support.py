"""Real kvmemd processes and real engine processes for the daemon tests.

`DaemonProcess` runs ``kvmemd start`` as a child in a private runtime directory and stops it
(checking that it cleaned up). `EngineProcess` runs ``tests/engine_child.py``, a real client
process driven line by line over its stdin/stdout with JSON replies. `RawEngine` is an engine
connection spoken by hand, message by message. `MappedPagesSampler` reads each model's mapped pages
from the daemons' status segments while an engine test runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from kvmem.common import protocol
from kvmem.common.protocol import PROTOCOL_VERSION, ConnectionClosed, MsgType
from kvmem.common.runtime import DaemonPaths
from kvmem.common.status import ModelStatus, StatusError, StatusReader, StatusSnapshot
from tests import fakecuda

REPO = Path(__file__).resolve().parent.parent

ENGINE_CHILD = str(REPO / "tests" / "engine_child.py")
KVMEMD = str(Path(sys.executable).parent / "kvmemd")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; return that value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class DaemonProcess:
    """A ``kvmemd start`` child process. Use as a context manager or call `stop()`."""

    def __init__(self, runtime_dir: Path, device: str, budget: str = "64MiB", *extra: str, env=None, gpu: int = 0):
        self.runtime_dir = runtime_dir
        self.device = device
        self.paths = DaemonPaths.resolve(runtime_dir, gpu)
        name = runtime_dir.name if gpu == 0 else f"{runtime_dir.name}.gpu{gpu}"  # several daemons in one directory
        self.counters_file = runtime_dir.parent / f"{name}.fakecuda-counters"
        self.log_path = runtime_dir.parent / f"{name}.kvmemd.log"
        self.args = [
            KVMEMD, "start", "--device", device, "--budget", budget, "--runtime-dir", str(runtime_dir),
            "--gpu", str(gpu), "--log-level", "debug", *extra,
        ]  # fmt: skip
        if env is None:  # the fake driver, unless the tests run on the real one (tests/support.py)
            real = os.environ.get("KVMEM_TEST_DRIVER") == "real"
            env = os.environ.copy() if real else fakecuda.child_env(FAKECUDA_COUNTERS_FILE=str(self.counters_file))
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=self._log)
        try:
            wait_for(self._serving, timeout=30, what=f"kvmemd to serve (log: {self.log_path})")
        except BaseException:
            if self.proc.poll() is None:  # never leave a daemon behind a failed start
                self.proc.kill()
                self.proc.wait(timeout=30)
            self._log.close()
            raise

    def _serving(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"kvmemd exited with {self.proc.returncode}:\n{self.log()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(str(self.paths.socket))
        except OSError:
            return False
        finally:
            sock.close()
        try:
            with StatusReader(self.paths.shm_name) as reader:
                return reader.snapshot().daemon.heartbeat_ns > 0  # the daemon's own first publish
        except StatusError:
            return False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> StatusSnapshot:
        with StatusReader(self.paths.shm_name) as reader:
            return reader.snapshot()

    def wait_for_model(
        self, name: str, predicate: Callable[[ModelStatus], bool], timeout: float = 10.0, what: str = "condition"
    ) -> StatusSnapshot:
        """Poll the status until model `name` is in it and `predicate` holds for it; return that snapshot.

        The daemon publishes a few ms after it acts (at most every 5 ms), so a model that has just
        connected may not be in the snapshot yet: that is "not yet", never an error.
        """

        def published() -> StatusSnapshot | None:
            snapshot = self.status()
            model = snapshot.model(name)
            return snapshot if model is not None and predicate(model) else None

        return wait_for(published, timeout=timeout, what=f"{what} (model {name!r})")

    def counters(self) -> dict[str, int]:
        return fakecuda.read_counters_from(self.counters_file)

    def kill(self) -> None:
        """SIGKILL: the daemon dies without cleaning up (stale socket, lock, status segment)."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop cleanly and check that nothing is left behind."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self._log.close()
        assert code == 0, f"kvmemd exited with {code}:\n{self.log()}"
        assert not self.paths.socket.exists(), "socket left behind"
        assert not self.paths.lock.exists(), "lock file left behind"
        assert not shm_exists(self.paths.shm_name), "status segment left behind"

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        cleanup_shm(self.paths.shm_name)


def shm_exists(name: str) -> bool:
    try:
        posix_ipc.SharedMemory(name).close_fd()
    except posix_ipc.ExistentialError:
        return False
    return True


class MappedPagesSampler:
    """Mapped pages of each model on each daemon, read from their status segments every 10 ms while
    in use (a context manager): `samples` holds one ``{(gpu, model): pages}`` per read."""

    def __init__(self, *daemons: DaemonProcess):
        self.daemons = daemons
        self.samples: list[dict[tuple[int, str], int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        readers = [(d.paths.gpu, StatusReader(d.paths.shm_name)) for d in self.daemons]
        try:
            while not self._stop.is_set():
                sample = {}
                for gpu, reader in readers:
                    sample.update({(gpu, m.model): m.mapped_pages for m in reader.snapshot().models})
                self.samples.append(sample)
                self._stop.wait(0.01)
        finally:
            for _, reader in readers:
                reader.close()

    def pages(self, model: str, gpu: int = 0) -> list[int]:
        """`model`'s mapped pages on `gpu`'s daemon in each sample (0 where it was not there)."""
        return [s.get((gpu, model), 0) for s in self.samples]

    def peak(self, model: str, gpu: int = 0) -> int:
        return max(self.pages(model, gpu), default=0)

    def __enter__(self) -> MappedPagesSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def cleanup_shm(name: str) -> None:
    """Unlink a segment a killed daemon left (tests unlink what they cause to exist)."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass  # nothing left: the daemon cleaned up


class EngineProcess:
    """A real client process (tests/engine_child.py) driven by commands; see that file."""

    def __init__(self, runtime_dir: Path, model: str, *flags: str, env=None):
        self.model = model
        self.proc = subprocess.Popen(
            [sys.executable, ENGINE_CHILD, "--runtime-dir", str(runtime_dir), "--model", model, *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env if env is not None else os.environ.copy(),
        )
        self.hello = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise AssertionError(f"engine {self.model} exited ({self.proc.returncode}): {self.proc.stderr.read()}")
        reply = json.loads(line)
        if "error" in reply:
            raise AssertionError(f"engine {self.model}: {reply['error']}")
        return reply

    def send(self, *words: object) -> None:
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()

    def call(self, *words: object) -> dict[str, Any]:
        self.send(*words)
        return self._reply()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL; what the engine wrote on stderr is kept in `proc_stderr`."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc_stderr = self.proc.stderr.read()
        self._close_pipes()

    def exit(self) -> int:
        if self.proc.poll() is None:
            self.send("exit")
            self.proc.wait(timeout=30)
        self._close_pipes()
        return self.proc.returncode

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass  # the child is gone: nothing to flush

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close_pipes()


class RawEngine:
    """An engine connection spoken by hand: HELLO, then whatever the test sends."""

    def __init__(self, daemon: DaemonProcess, model: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        self.sock.connect(str(daemon.paths.socket))
        hello = {"version": PROTOCOL_VERSION, "role": "engine", "model": model, "asleep": False}
        protocol.send_message(self.sock, MsgType.HELLO, hello | {"adopt": 0, "page_size": 0})
        assert [self.receive().type for _ in range(2)] == [MsgType.WELCOME, MsgType.POLICY]

    def receive(self, sock: socket.socket | None = None) -> protocol.Message:
        msg = protocol.receive_message(sock or self.sock)
        protocol.close_fds(msg.fds)  # only the ids matter here; the pages stay held by this connection
        return msg

    def open_channel(self, kind: int = socket.SOCK_SEQPACKET) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        ours.settimeout(10)
        with theirs:
            protocol.send_message(self.sock, MsgType.CHANNEL, {}, [theirs.fileno()])
        return ours

    def refusal(self) -> str:
        """The ERROR the daemon sent before closing this connection (skipping anything queued before it)."""
        while True:
            msg = self.receive()
            if msg.type == MsgType.ERROR:
                with pytest.raises(ConnectionClosed):
                    self.receive()
                return msg["message"]

    def close(self) -> None:
        self.sock.close()
