"""One way to undo a multi-step sequence that fails half-way (create -> map -> set access, ...).

    with Undo() as undo:
        mapping = device.map(reservation, offset, page)
        undo.push(mapping.close)               # registered once the step it undoes succeeded
        device.set_access(reservation, offset, size)
    # the block finished: nothing is undone, the caller owns what it made

If the block raises, the undo steps run in reverse order of registration and the block's exception
propagates. An undo step that fails too is logged with its traceback and the remaining steps still
run: an error during rollback never hides the error that caused it (as cuda.core's transactions do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)


class Undo:
    """Undo steps for the sequence inside a ``with`` block, run only if the block raises."""

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def push(self, step: Callable[..., Any], *args: Any) -> None:
        """Register `step(*args)` to undo what has just been done."""
        self._steps.append((step, args))

    def __enter__(self) -> Undo:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        steps, self._steps = self._steps, []
        if exc_type is None:
            return
        for step, args in reversed(steps):
            try:
                step(*args)
            except Exception:
                logger.exception("undoing %s after %s failed", getattr(step, "__qualname__", step), exc_type.__name__)
