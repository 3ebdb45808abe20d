"""Run a real vLLM engine (in-process, CPU) on a model directory; print greedy token ids as JSON.

    python tests/vllm_child.py MODEL_DIR PROMPTS_JSON [--hold]

Each prompt is a list of token ids; the output line is ``{"tokens": [[...], ...], "kvmem": ...}``,
where "kvmem" is null when the engine's KV cache is not on kvmem, else the pages and bytes its
reservation holds and whether vLLM's KV cache tensors lie inside that reservation. With
``--hold`` the engine stays up after printing, until a line arrives on stdin (so that a test can
read the daemon's status while the engine holds its KV cache). Whether kvmem is used is up to the
environment (KVMEM=1 and friends): the plugin is loaded through its entry point, as in production.
"""

from __future__ import annotations

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from kvmem.integrations.vllm import allocation

NEW_TOKENS = 16


def kvmem_report(llm: LLM) -> dict | None:
    """The kvmem cache behind this in-process engine's KV cache, or None (see the module docstring)."""
    session = allocation._session
    if session is None:
        return None
    cache = session.caches[0]
    start = cache.reservation.address
    end = start + cache.num_ranges * cache.range_bytes
    # vllm 0.32 in-process engine: LLM.llm_engine.model_executor.driver_worker.worker.model_runner
    # holds the per-layer views it bound to the model in `kv_caches`.
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    inside = [start <= t.data_ptr() < end for t in runner.kv_caches]
    stats = cache.stats()
    return {"pages_held": stats.pages_held, "mapped_bytes": stats.mapped_bytes, "views_inside": inside}


def main() -> None:
    model_dir, prompts_json, *flags = sys.argv[1:]
    prompts = json.loads(prompts_json)
    llm = LLM(
        model=model_dir,
        served_model_name="tiny-llama",
        dtype="float32",
        block_size=32,  # the CPU attention backend wants a multiple of 32
        max_model_len=256,
        # A fixed KV size: on CPU, vLLM otherwise reserves gpu_memory_utilization (0.9) of the
        # machine's memory and refuses to start when other processes use more than 10% of it
        # (vllm 0.32 v1/worker/cpu_worker.py).
        kv_cache_memory_bytes=64 << 20,
        num_gpu_blocks_override=64,
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    print(json.dumps({"tokens": tokens, "kvmem": kvmem_report(llm)}), flush=True)
    if "--hold" in flags:
        sys.stdin.readline()


if __name__ == "__main__":
    main()
