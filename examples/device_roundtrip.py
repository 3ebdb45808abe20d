"""kvmem's device layer end to end: pages made in one process, used in another.

The parent opens the default device (a GPU through CUDA VMM if one is usable, else host RAM),
reserves a virtual range, creates physical pages, maps them and grants access in one call, writes
a pattern, then hands the pages to a child process as file descriptors over a Unix socket
(SCM_RIGHTS), exactly as kvmemd will hand pages to engines. The child imports them into its own
reservation, checks the parent's bytes and writes its own answer; the parent reads the answer
back through its own mappings. Everything is unmapped, released and freed at the end.

    python examples/device_roundtrip.py [--device auto|cuda|host] [--gpu N] [--pages N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from kvmem.device import DEVICE_KINDS, Device, DeviceError, open_device

MAX_HEADER = 4096


def pattern(tag: str, index: int, size: int) -> bytes:
    """A page-sized pattern that differs per page and per writer."""
    unit = f"[{tag} page {index}]".encode()
    return (unit * (size // len(unit) + 1))[:size]


class StepLog:
    def __init__(self, who: str):
        self.who = who
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        ms = (time.perf_counter() - self.t0) * 1e3
        print(f"  {self.who:6} {ms:8.2f} ms  {message}", flush=True)


def run_parent(kind: str, gpu: int, num_pages: int) -> int:
    with open_device(kind, gpu) as dev:
        log = StepLog("parent")
        info = dev.memory_info()
        print(
            f"device: {dev.kind} ({dev.name}), granularity {dev.granularity >> 10} KiB, "
            f"{info.free / 2**30:.1f} of {info.total / 2**30:.1f} GiB free"
        )
        page_size = dev.granularity
        reservation = dev.reserve(2 * num_pages * page_size)
        log(f"reserved {reservation.size >> 20} MiB of virtual addresses at {reservation.address:#x}")
        pages = [dev.create_page() for _ in range(num_pages)]
        log(f"created {num_pages} physical pages of {page_size >> 10} KiB")
        mappings = [dev.map(reservation, i * page_size, page) for i, page in enumerate(pages)]
        dev.set_access(reservation, 0, num_pages * page_size)
        log(f"mapped them at offsets 0..{(num_pages - 1) * page_size:#x}, read/write access in one call")
        for i, mapping in enumerate(mappings):
            dev.copy_host_to_device(mapping.address, pattern("parent", i, page_size))
        log("wrote a pattern into every page")

        exported = [page.export() for page in pages]
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", str(child_sock.fileno()), "--device", dev.kind, "--gpu", str(gpu)],
            pass_fds=(child_sock.fileno(),),
        )
        child_sock.close()
        try:
            header = json.dumps({"page_size": page_size, "pages": num_pages}).encode()
            socket.send_fds(parent_sock, [header], [e.fd for e in exported])
            log(f"sent {num_pages} page descriptors to child pid {child.pid} over a Unix socket (SCM_RIGHTS)")
            for e in exported:
                e.close()  # the child holds its own copies now
            reply = json.loads(parent_sock.recv(MAX_HEADER) or b"{}")
        finally:
            parent_sock.close()
            status = child.wait(timeout=60)
        if status != 0 or not reply.get("ok"):
            print(f"child failed (exit {status}): {reply.get('error', 'no reply')}", file=sys.stderr)
            return 1
        log("child imported, verified and overwrote the pages")

        half = page_size // 2
        for i, mapping in enumerate(mappings):
            got = dev.read(mapping.address, page_size)
            if got[:half] != pattern("parent", i, page_size)[:half] or got[half:] != pattern("child", i, half):
                print(f"page {i}: the bytes read back are not what parent and child wrote", file=sys.stderr)
                return 1
        log("read the child's writes back through the parent's own mappings: all pages match")

        dev.synchronize()  # nothing may still touch the pages when they are unmapped
        for mapping in mappings:
            mapping.close()
        for page in pages:
            page.close()
        reservation.close()
        log("unmapped, released and freed everything")
    print(f"ok: {num_pages} pages shared between two processes on the {dev.kind} device")
    return 0


def run_child(sock_fd: int, kind: str, gpu: int) -> int:
    sock = socket.socket(fileno=sock_fd)
    log = StepLog("child")
    try:
        msg, fds, _, _ = socket.recv_fds(sock, MAX_HEADER, 64)
        header = json.loads(msg)
        page_size, num_pages = header["page_size"], header["pages"]
        with open_device(kind, gpu) as dev:
            check_child(dev, fds, page_size, num_pages, log)
        sock.sendall(json.dumps({"ok": True}).encode())
        return 0
    except (DeviceError, OSError, ValueError, KeyError) as exc:
        sock.sendall(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return 1
    finally:
        sock.close()


def check_child(dev: Device, fds: list[int], page_size: int, num_pages: int, log: StepLog) -> None:
    if len(fds) != num_pages:
        raise ValueError(f"expected {num_pages} descriptors, got {len(fds)}")
    try:
        pages = [dev.import_page(fd, page_size) for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)  # import does not take ownership
    with dev.reserve(num_pages * page_size) as reservation:
        mappings = [dev.map(reservation, i * page_size, page) for i, page in enumerate(pages)]
        dev.set_access(reservation, 0, num_pages * page_size)
        log(f"imported {num_pages} pages and mapped them at {reservation.address:#x} (pid {os.getpid()})")
        for i, mapping in enumerate(mappings):
            if dev.read(mapping.address, page_size) != pattern("parent", i, page_size):
                raise ValueError(f"page {i} does not hold the parent's pattern")
        log("every page holds the parent's pattern")
        half = page_size // 2
        for i, mapping in enumerate(mappings):
            dev.copy_host_to_device(mapping.address + half, pattern("child", i, half))
        dev.synchronize()
        log("wrote an answer into the second half of every page")
        for page in pages:
            page.close()  # memory stays while mapped; the reservation's close unmaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=DEVICE_KINDS, default=os.environ.get("KVMEM_DEVICE", "auto"))
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return run_child(args.child, args.device, args.gpu)
    if not 1 <= args.pages <= 64:
        parser.error("--pages must be between 1 and 64")
    try:
        return run_parent(args.device, args.gpu, args.pages)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
