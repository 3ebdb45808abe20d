"""Build, load and inspect the fake CUDA driver (`fakecuda.c`, SONAME ``libcuda.so.1``).

Used by `tests/conftest.py` and by the benchmarks. The library is built with gcc into
``tests/fakecuda/build/`` (rebuilt when a source is newer). To make cuda-bindings use it:

- in this process, `load()` it with RTLD_GLOBAL before the first driver call: cuda.pathfinder
  takes an already-loaded ``libcuda.so.1``;
- in child processes, put `library_dir()` on LD_LIBRARY_PATH (`child_env()`): the dynamic loader
  reads LD_LIBRARY_PATH at process start only.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = (SOURCE_DIR / "fakecuda.c", SOURCE_DIR / "fakecuda_entries.h")
BUILD_DIR = SOURCE_DIR / "build"
LIBRARY_NAME = "libcuda.so.1"


def library_dir() -> Path:
    return BUILD_DIR


def build() -> Path:
    """Compile the fake if it is missing or older than its sources; return its path."""
    BUILD_DIR.mkdir(exist_ok=True)
    target = BUILD_DIR / LIBRARY_NAME
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test sessions build once
        newest = max(p.stat().st_mtime for p in SOURCES)
        if target.exists() and target.stat().st_mtime >= newest:
            return target
        tmp = BUILD_DIR / f"{LIBRARY_NAME}.{os.getpid()}.tmp"
        cmd = [
            "gcc", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
            f"-Wl,-soname,{LIBRARY_NAME}", "-o", str(tmp), str(SOURCES[0]), "-lpthread",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=SOURCE_DIR)
        tmp.replace(target)
    return target


@dataclass(frozen=True)
class Lookup:
    """One cuGetProcAddress request the fake received."""

    name: str
    version: int
    found: bool


class FakeCuda:
    """The loaded fake driver's introspection API (in this process)."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        self.lib.fakecuda_counter.restype = ctypes.c_uint64
        self.lib.fakecuda_counter.argtypes = [ctypes.c_char_p]
        self.lib.fakecuda_table_entry.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_int),
        ]  # fmt: skip
        self.lib.fakecuda_lookup_entry.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
        ]  # fmt: skip

    def counter(self, name: str) -> int:
        """Calls of entry point `name` (base name, e.g. "cuMemCreate"), or a "live.*" gauge."""
        value = self.lib.fakecuda_counter(name.encode())
        if value == 2**64 - 1:
            raise KeyError(f"fakecuda has no counter {name!r}")
        return value

    def counters(self) -> dict[str, int]:
        return dict(read_counters_from(None, self))

    def reset_call_counters(self) -> None:
        self.lib.fakecuda_reset_call_counters()

    def table(self) -> list[tuple[str, int]]:
        """The fake's (name, version) proc-address table."""
        out = []
        for i in range(self.lib.fakecuda_table_size()):
            name, version = ctypes.c_char_p(), ctypes.c_int()
            self.lib.fakecuda_table_entry(i, ctypes.byref(name), ctypes.byref(version))
            out.append((name.value.decode(), version.value))
        return out

    def lookups(self) -> list[Lookup]:
        """Every cuGetProcAddress request so far, in order."""
        out = []
        for i in range(self.lib.fakecuda_lookup_count()):
            name, version, found = ctypes.c_char_p(), ctypes.c_int(), ctypes.c_int()
            self.lib.fakecuda_lookup_entry(i, ctypes.byref(name), ctypes.byref(version), ctypes.byref(found))
            out.append(Lookup(name.value.decode(), version.value, bool(found.value)))
        return out


def load() -> FakeCuda:
    """Build the fake and load it into this process ahead of any real driver."""
    return FakeCuda(build())


# This test session's fake GPUs: their UUIDs carry a seed of the session's own (fakecuda.c), so
# that test sessions running at once on one machine never hold "the same GPU" (kvmemd refuses a
# second daemon for a GPU machine-wide). Set before the fake is loaded; children inherit it.
UUID_SEED = int(os.environ.setdefault("FAKECUDA_UUID_SEED", str(os.getpid() % 0xFFFFFF + 1)))


def gpu_uuid(physical: int) -> str:
    """The UUID the fake gives physical device `physical` in this session, as nvidia-smi writes it."""
    s = UUID_SEED & 0xFFFFFF
    return f"GPU-fa4ec0da-{s >> 8:04x}-40{s & 0xFF:02x}-8000-{physical:012x}"


def child_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment in which a child process's cuda-bindings loads the fake."""
    env = dict(os.environ if base is None else base)
    paths = [str(library_dir())] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join(paths)
    env.update(extra)
    return env


# The fake's gauges of what is alive now (fakecuda.c, after the per-entry-point call counters).
LIVE_GAUGES = (
    "live.reservations",
    "live.handles",
    "live.allocations",
    "live.mappings",
    "live.charged_bytes",
    "live.host_allocations",
)

# Counters file layout (FAKECUDA_COUNTERS_FILE): "FAKECUDA", u32 version, u32 count, then
# `count` entries of {char name[56]; u64 value}.
_HEADER = struct.Struct("=8sII")
_ENTRY = struct.Struct("=56sQ")


def read_counters_from(path: str | os.PathLike | None, fake: FakeCuda | None = None) -> dict[str, int]:
    """Read another process's counters from its FAKECUDA_COUNTERS_FILE (or this process's)."""
    if path is None:
        assert fake is not None
        names = [n for n, _ in fake.table()]
        names += list(LIVE_GAUGES)
        return {n: fake.counter(n) for n in dict.fromkeys(names)}
    data = Path(path).read_bytes()
    magic, version, count = _HEADER.unpack_from(data, 0)
    if magic != b"FAKECUDA" or version != 1:
        raise ValueError(f"{path} is not a fakecuda counters file")
    out = {}
    for i in range(count):
        raw_name, value = _ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size)
        out[raw_name.split(b"\0", 1)[0].decode()] = value
    return out
