"""`kvmem.common.sizes`: sizes as operators write them, and the errors they get when they write them wrong."""

from __future__ import annotations

import pytest

from kvmem.common.sizes import format_size, parse_size

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GB", 20 * 10**9),
        ("20GiB", 20 * 2**30),
        ("512M", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("4K", 4096),
        ("4KB", 4000),
        ("4KiB", 4096),
        ("2T", 2 * 2**40),
        ("2TB", 2 * 10**12),
        ("2TiB", 2 * 2**40),
        ("1G", 2**30),
        ("1048576", 1048576),
        ("0", 0),
        ("7B", 7),
        ("1.5GiB", 3 * 2**29),
        ("1.5G", 1610612736),
        ("0.5KiB", 512),
        ("20gb", 20 * 10**9),
        ("20gib", 20 * 2**30),
        (" 20 GiB ", 20 * 2**30),
    ],
)
def test_units_decimal_binary_and_bare_letters(text: str, expected: int):
    """Decimal units are powers of 1000, binary units and bare letters powers of 1024, case-insensitively."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.01KB", 2010),
        ("8.03KB", 8030),
        ("16.06KB", 16060),
        ("1.1MB", 1_100_000),
        ("2.3GB", 2_300_000_000),
        ("9007199254740993", 2**53 + 1),
        ("0.7KiB", 716),  # 716.8 bytes: a fractional byte is dropped
    ],
)
def test_fractions_and_large_counts_are_exact(text: str, expected: int):
    """Arithmetic is exact: no float rounding turns 2.01KB into 2009 bytes or loses bytes above 2**53."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [
        ("25%", 80 * GiB, 20 * GiB),
        ("100%", 12345, 12345),
        ("0%", 12345, 0),
        ("12.5 %", 2**40, 2**37),
        ("33.3%", 1000, 333),
        ("50%", 2**62 + 2, 2**61 + 1),
        ("90%", 10, 9),
    ],
)
def test_percentages_are_shares_of_the_total(text: str, total: int, expected: int):
    """A percentage is taken of the given total, rounded down to a whole byte, exactly even for huge totals."""
    assert parse_size(text, total) == expected


def test_plain_sizes_ignore_the_total():
    """A size that is not a percentage means the same bytes whatever the total."""
    assert parse_size("2GiB", total=1) == 2 * GiB


@pytest.mark.parametrize(
    ("text", "total", "fragment"),
    [
        ("20XB", None, "is not understood"),
        ("20 gigabytes", None, "is not understood"),
        ("1e3", None, "is not understood"),
        ("1,000", None, "is not understood"),
        ("", None, "is not understood"),
        ("   ", None, "is not understood"),
        ("GiB", None, "is not understood"),
        ("-5GB", None, "is not understood"),
        ("-1", None, "is not understood"),
        ("-5%", 100, "is not understood"),
        ("25%", None, "there is no total"),
        ("100.5%", 1000, "more than 100%"),
        ("250%", 1000, "more than 100%"),
    ],
)
def test_bad_sizes_are_a_one_line_value_error_naming_the_text(text: str, total: int | None, fragment: str):
    """Every refusal is a ValueError on one line that quotes the operator's text and says what is wrong."""
    with pytest.raises(ValueError) as info:
        parse_size(text, total)
    message = str(info.value)
    assert repr(text) in message
    assert fragment in message
    assert "\n" not in message


def test_the_not_understood_message_shows_accepted_forms():
    """The message for an unknown unit gives examples of every accepted form."""
    with pytest.raises(ValueError, match=r"^size '3 parsecs' is not understood: use e\.g\. 20GB, 20GiB, 512M, "):
        parse_size("3 parsecs")


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2**20, "1.0 MiB"),
        (3 * 2**29, "1.5 GiB"),
        (20 * 10**9, "18.6 GiB"),
        (2**40, "1.0 TiB"),
        (2**50, "1024.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size_uses_binary_units(n: int, expected: str):
    """format_size renders with the largest binary unit below 1024 of it (TiB at most), one decimal."""
    assert format_size(n) == expected


@pytest.mark.parametrize("text", ["1.5 GiB", "512.0 MiB", "3.0 KiB", "1023 B"])
def test_format_size_output_parses_back(text: str):
    """What format_size prints (for exact values) is accepted by parse_size and means the same bytes."""
    assert format_size(parse_size(text)) == text
