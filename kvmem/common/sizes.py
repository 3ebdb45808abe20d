"""Byte sizes as operators write them: ``20GB``, ``20GiB``, ``512M``, ``25%``.

Decimal units (``KB``, ``MB``, ``GB``, ``TB``) are powers of 1000 and binary units (``KiB``,
``MiB``, ``GiB``, ``TiB``) powers of 1024; a bare letter (``K``, ``M``, ``G``, ``T``) is binary, as
in systemd and Docker. A percentage needs the total it is a share of.
"""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes meant by `text`.

    Args:
        text: e.g. ``"20GB"``, ``"20GiB"``, ``"512M"``, ``"1048576"``, or ``"25%"``.
        total: What a percentage is a share of (required for percentages).

    Raises:
        ValueError: With a one-line message naming the text and what is accepted.
    """
    percent = _PERCENT.match(text)
    if percent:
        share = Fraction(percent.group(1))
        if total is None:
            raise ValueError(f"size {text!r} is a percentage, but there is no total to take it of here")
        if share > 100:
            raise ValueError(f"size {text!r} is more than 100%")
        return int(total * share / 100)
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"size {text!r} is not understood: use e.g. 20GB, 20GiB, 512M, 1048576 or 25%")
    return int(Fraction(match.group(1)) * _UNITS[unit])  # exact: a float makes 2.01KB 2009 bytes


def format_size(n: int) -> str:
    """A short binary-unit rendering, e.g. ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
