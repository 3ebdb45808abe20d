"""The operator's connection to kvmemd: policy changes, sleep and wake, status over the socket.

Reading status does not need this: `kvmem.common.status.StatusReader` reads shared memory directly.
Authorization is the daemon's: it checks the caller's uid (SO_PEERCRED) against the model's owner.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from kvmem.common import protocol
from kvmem.common.errors import ControlError, DaemonRefusedError
from kvmem.common.protocol import MsgType
from kvmem.common.runtime import DaemonPaths


class ControlClient:
    """A control session with the daemon of one GPU (blocking request/reply).

    Raises:
        kvmem.common.errors.DaemonUnavailableError: No daemon answers.
    """

    def __init__(self, gpu: int = 0, runtime_dir: str | os.PathLike | None = None, timeout: float = 10.0):
        self.paths = DaemonPaths.resolve(runtime_dir, gpu)
        self._sock = self.paths.connect()
        self._sock.settimeout(timeout)
        self._req = itertools.count(1)
        try:
            protocol.send_message(
                self._sock,
                MsgType.HELLO,
                {
                    "version": protocol.PROTOCOL_VERSION,
                    "role": "control",
                    "model": None,
                    "asleep": False,
                    "adopt": 0,
                    "page_size": 0,
                },
            )
            self.welcome = protocol.receive_expected(self._sock, MsgType.WELCOME).body
        except BaseException:
            self._sock.close()
            raise

    @property
    def page_size(self) -> int:
        return self.welcome["page_size"]

    def request(self, op: str, model: str | None = None, value: int | None = None) -> Any:
        """Send one control request and return the reply's data, or raise ControlError."""
        req = next(self._req)
        protocol.send_message(self._sock, MsgType.CONTROL, {"req": req, "op": op, "model": model, "value": value})
        try:
            reply = protocol.receive_expected(self._sock, MsgType.REPLY)
        except DaemonRefusedError as exc:
            raise ControlError(str(exc), "refused") from None
        except TimeoutError:
            raise ControlError(f"kvmemd did not answer {op} in time", "timeout") from None
        if reply["req"] != req:
            raise ControlError(f"kvmemd answered request {reply['req']}, not {req}", "refused")
        if not reply["ok"]:
            raise ControlError(reply["error"], reply["code"] or "invalid")
        return reply["data"]

    def set_limit(self, model: str, limit_bytes: int | None) -> Any:
        """Cap `model` at `limit_bytes` (None: no limit). Pages over the cap are asked back."""
        return self.request("set_limit", model, -1 if limit_bytes is None else limit_bytes)

    def set_min(self, model: str, min_bytes: int) -> Any:
        return self.request("set_min", model, min_bytes)

    def set_priority(self, model: str, priority: int) -> Any:
        return self.request("set_priority", model, priority)

    def sleep(self, model: str, offload: bool = False) -> Any:
        """Put `model` to sleep; with `offload` its KV cache is kept in the daemon's host tier."""
        return self.request("sleep", model, 1 if offload else 0)

    def wake(self, model: str) -> Any:
        return self.request("wake", model)

    def forget(self, model: str) -> Any:
        """Drop a detached model's policy (a limit set for a name no engine uses)."""
        return self.request("forget", model)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
