"""On a real GPU: the fake-driver contract tests again on the real driver, and what only a GPU can show.

The `gpu` tests are skipped where no real ``libcuda.so.1`` loads (`make gpu-check` runs them). This
process has the fake loaded, so the work runs in children whose environment leaves it out: a child
pytest with ``KVMEM_TEST_DRIVER=real`` runs the "cuda" cases of the device and daemon tests on the real
driver (tests/support.py), and the rest are processes on the real driver. The two-engine scenario also
runs on the fake driver, everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_support import DaemonProcess, EngineProcess, wait_for
from tests.support import REPO, real_driver_env

KVCTL = str(Path(sys.executable).parent / "kvctl")
MiB = 1 << 20


def gpu_env(**extra: str) -> dict[str, str]:
    """The real driver, compiled Triton (not the interpreter the CPU tests use), and `extra`."""
    env = {k: v for k, v in real_driver_env().items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def run_tests_on_the_real_driver(*args: str) -> None:
    """A child pytest over `args` with "cuda" meaning the real driver; every selected test must pass."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "-m", "not gpu", *args],
        env=gpu_env(KVMEM_TEST_DRIVER="real"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{summary}\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


@pytest.mark.gpu
def test_the_device_contract_holds_on_the_real_driver():
    """tests/test_device.py's "cuda" cases: alignment, ALREADY_MAPPED, set-access runs, release while
    mapped, out of memory (a bounded loop over what the GPU has free), a page exported here and imported
    and written by another process, no leaks over 1000 cycles, host buffers."""
    run_tests_on_the_real_driver("tests/test_device.py", "-k", "cuda")


@pytest.mark.gpu
def test_the_daemon_grants_limits_scrubs_recovers_and_sleeps_on_the_real_driver():
    """A real kvmemd --device cuda with engine processes: grant and return, a limit that denies and asks
    pages back, an engine SIGKILLed mid-grant gives every page back, a page that changes tenant reads
    zeros, and sleep (discarding, and --offload with wake byte-identical at the same addresses)."""
    selected = (
        "cuda and (grant_and_return or limit_denies or killed_mid_grant or zeroed_before or "
        "sleep_returns_pages or offload_sleep_and_wake or discarding_sleep)"
    )
    run_tests_on_the_real_driver("tests/test_daemon.py", "tests/test_sleep.py", "-k", selected)


@pytest.mark.parametrize("driver", ["fake", pytest.param("real", marks=pytest.mark.gpu)])
def test_two_engines_under_kvctl_limit_and_a_sigkill(driver: str, tmp_path: Path):
    # The fake: LD_LIBRARY_PATH names it (tests/support.py); the daemon also counts its calls.
    env = gpu_env(KVMEM_TEST_DRIVER="real") if driver == "real" else os.environ.copy()
    runtime_dir = tmp_path / "rt"
    with (
        DaemonProcess(
            runtime_dir, "cuda", "128MiB", "--reserve", "0", "0", env=env if driver == "real" else None
        ) as daemon,
        EngineProcess(runtime_dir, "alpha", env=env) as alpha,
        EngineProcess(runtime_dir, "beta", env=env) as beta,
    ):
        assert alpha.call("grow", 10)["granted"] == 10 and beta.call("grow", 10)["granted"] == 10
        alpha.call("map")
        beta.call("map")
        alpha.call("write", 0xA1)
        beta.call("write", 0xB2)
        limit = subprocess.run(
            [KVCTL, "--runtime-dir", str(runtime_dir), "limit", "alpha", "8MiB"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert limit.returncode == 0, limit.stderr
        # A lowered limit is one POLICY whose target the engine follows (no RECLAIM).
        events = wait_for(
            lambda: (ev := alpha.call("events")["events"]) and ["target", 4] in ev and ev, what="the POLICY"
        )
        assert not [e for e in events if e[0] == "reclaim"]
        alpha.call("return", 6)
        daemon.wait_for_model("alpha", lambda m: m.mapped_pages == 4, what="alpha under its limit")
        assert sorted(alpha.call("read")["pages"].values()) == [[0xA1, True]] * 4
        assert sorted(beta.call("read")["pages"].values()) == [[0xB2, True]] * 10
        status = subprocess.run(
            [KVCTL, "--runtime-dir", str(runtime_dir), "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert {m["model"] for m in json.loads(status.stdout)["models"]} >= {"alpha", "beta"}
        beta.kill()
        wait_for(lambda: daemon.status().daemon.pages_granted == 4, what="beta's pages back after SIGKILL")
        assert alpha.call("grow", 1, 0)["denied"] == "limit"
        assert alpha.exit() == 0
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="every page back")


GPU_FAULT = """
from cuda.bindings import driver as cu
from kvmem.device import open_device

dev = open_device("cuda")
g = dev.granularity
reservation = dev.reserve(2 * g)
pages = [dev.create_page(), dev.create_page()]
allowed, denied = dev.map(reservation, 0, pages[0]), dev.map(reservation, g, pages[1])
dev.set_access(reservation, 0, g)
assert cu.cuMemsetD8(allowed.address, 7, g)[0] == cu.CUresult.CUDA_SUCCESS
assert cu.cuCtxSynchronize()[0] == cu.CUresult.CUDA_SUCCESS
assert dev.read(allowed.address, 4) == bytes([7]) * 4
# The driver itself, past kvmem's checks: a GPU write to a page mapped without access.
launched = cu.cuMemsetD8(denied.address, 7, g)[0]
synchronized = cu.cuCtxSynchronize()[0]
print(launched.name, synchronized.name)
"""


@pytest.mark.gpu
def test_a_gpu_write_before_set_access_faults_and_with_access_succeeds():
    """The GPU faults (an error from the memset or from the next synchronize; the context may be lost,
    hence a child process) where the fake's CPU read would SIGSEGV."""
    result = subprocess.run(
        [sys.executable, "-c", GPU_FAULT], env=gpu_env(), capture_output=True, text=True, timeout=120, cwd=REPO
    )
    detail = f"rc {result.returncode}: {result.stdout}{result.stderr[-2000:]}"
    errors = result.stdout.split()
    if len(errors) == 2:  # the child lived to tell what the memset and the synchronize returned
        assert errors != ["CUDA_SUCCESS", "CUDA_SUCCESS"], f"the GPU wrote a page mapped without access; {detail}"
    else:  # the fault took the child down
        assert result.returncode != 0 and "AssertionError" not in result.stderr, detail


TINY_MODEL = """
import torch
from transformers import DynamicCache, GenerationConfig, LlamaConfig, LlamaForCausalLM

import kvmem
from kvmem.integrations.transformers import CACHE_ARGUMENT, KvmemCache

assert torch.cuda.is_available(), "CUDA torch is needed for this test"
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = LlamaForCausalLM(config).eval().cuda()
prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 49))]
width = max(map(len, prompts))
ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts]).cuda()
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).cuda()
greedy = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
for attn in ("sdpa", "eager", "kvmem_paged"):
    model.set_attn_implementation("sdpa" if attn == "kvmem_paged" else attn)
    expected = model.generate(ids, attention_mask=mask, generation_config=greedy,
                              **{CACHE_ARGUMENT: DynamicCache(config=config)})
    model.set_attn_implementation(attn)
    with (kvmem.local(device="cuda", budget="256MiB") as session,
          KvmemCache(session, config, max_tokens=4096, low_watermark=0, high_watermark=0) as cache):
        assert cache.kv.k[0].is_cuda, "the kvmem blocks are not on the GPU"
        got = model.generate(ids, attention_mask=mask, generation_config=greedy, **{CACHE_ARGUMENT: cache})
    assert torch.equal(got, expected), f"{attn}: {got.tolist()} != {expected.tolist()}"
print("ok")
"""


@pytest.mark.gpu
def test_a_tiny_model_on_kvmem_cache_generates_the_default_caches_tokens_on_the_gpu():
    result = subprocess.run(
        [sys.executable, "-c", TINY_MODEL], env=gpu_env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")
