"""Child-process actions for the device tests (a real second process, real fds, real mappings).

python tests/device_child.py import-write KIND FD SIZE EXPECT_BYTE WRITE_BYTE
    Import the page behind FD, check every byte equals EXPECT_BYTE, fill it with WRITE_BYTE.
python tests/device_child.py touch KIND ACCESS
    Map a page with ACCESS (none|read|read_write) and read its first byte through the raw
    pointer: without access the process must die of SIGSEGV, as a GPU would fault.
"""

from __future__ import annotations

import ctypes
import os
import sys

from kvmem.device import Access, open_device


def import_write(kind: str, fd: int, size: int, expect: int, write: int) -> int:
    with open_device(kind) as dev:
        page = dev.import_page(fd, size)
        os.close(fd)  # import_page does not take ownership
        with dev.reserve(size) as reservation:
            mapping = dev.map(reservation, 0, page)
            dev.set_access(reservation, 0, size)
            data = dev.read(mapping.address, size)
            if data != bytes([expect]) * size:
                print(f"page holds {data[:16]!r}..., expected byte {expect}", file=sys.stderr)
                return 3
            dev.memset(mapping.address, write, size)
            dev.synchronize()
            page.close()
    return 0


def touch(kind: str, access: str) -> int:
    dev = open_device(kind)
    reservation = dev.reserve(dev.granularity)
    page = dev.create_page()
    mapping = dev.map(reservation, 0, page)
    if access != "none":
        dev.set_access(reservation, 0, dev.granularity, Access[access.upper()])
    value = ctypes.c_ubyte.from_address(mapping.address).value  # faults without access
    print(f"read {value}")
    dev.close()
    return 0


def main(argv: list[str]) -> int:
    action, kind, *rest = argv
    if action == "import-write":
        fd, size, expect, write = map(int, rest)
        return import_write(kind, fd, size, expect, write)
    if action == "touch":
        return touch(kind, rest[0])
    raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
