"""The errors that cross a process boundary: what the daemon, engines and kvctl tell each other.

Each names what went wrong; a message that reaches an operator says what to do about it.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A frame or message that breaks the protocol (it costs its sender the connection)."""


class ConnectionClosed(Exception):
    """The peer closed the connection."""


class DaemonUnavailableError(ConnectionError):
    """No kvmemd answers at the socket for this GPU and runtime directory."""


class DaemonPermissionError(DaemonUnavailableError):
    """A daemon listens, but its socket is not open to this user."""


class DaemonRefusedError(ConnectionError):
    """The daemon refused the connection (the reason is in the message)."""


class ControlError(Exception):
    """A control request the daemon refused, or could not answer; the message says why.

    The daemon raises it inside a control operation and sends its text and code in the REPLY;
    `kvmem.control.ControlClient` raises it again on the operator's side.

    Attributes:
        code: One of `kvmem.common.protocol.CONTROL_ERROR_CODES`, or "timeout" / "refused" when
            the daemon did not answer or refused the connection.
    """

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(message)
        self.code = code
