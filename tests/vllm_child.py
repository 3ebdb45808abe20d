"""Run a real vLLM engine (in-process, CPU) on a model directory and drive it with JSON lines.

    python tests/vllm_child.py MODEL_DIR [--no-prefix-caching] [--max-num-seqs N]

It prints ``{"ready": ..., "kvmem": ...}`` once the engine is up, then answers each command line
on stdin with one JSON line:

- ``{"op": "generate", "prompts": [[token ids], ...], "new_tokens": 16}``: greedy generation of
  every prompt in one `LLM.generate` call (a batch vLLM schedules as it sees fit); the reply has
  the new token ids of each prompt, how many prompt tokens each found in vLLM's prefix cache
  (``cached_tokens``), the engine's preemption count and the kvmem report;
- ``{"op": "report"}``: the kvmem report alone;
- ``{"op": "exit"}``: stop.

The kvmem report is null when the engine's KV cache is not on kvmem, else the pages its cache
holds, its block geometry, whether vLLM's KV tensors lie inside the kvmem reservation, and the
block pool's class. Whether kvmem is used is up to the environment (KVMEM=1 and friends): the
plugin is loaded through its entry point, as in production.
"""

from __future__ import annotations

import argparse
import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from kvmem.integrations.vllm import allocation


def kvmem_report(llm: LLM) -> dict | None:
    """The kvmem cache behind this in-process engine's KV cache, or None (see the module docstring).

    With VLLM_ENABLE_V1_MULTIPROCESSING=1 the engine core, and kvmem's cache, live in a child
    process: there is nothing to report from here (None).
    """
    cache = allocation.current_cache()
    if cache is None:
        return None
    start = cache.reservation.address
    end = start + cache.num_ranges * cache.range_bytes
    # vllm 0.32 in-process engine: LLM.llm_engine.model_executor.driver_worker.worker.model_runner
    # holds the per-layer views it bound to the model in `kv_caches`; the scheduler's block pool is
    # LLM.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool.
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    stats = cache.stats()
    return {
        "pages_held": stats.pages_held,
        "mapped_slots": stats.mapped_slots,
        "blocks_per_slot": cache.blocks_per_slot,
        "pages_per_slot": cache.pages_per_growth,
        "num_blocks": pool.num_gpu_blocks,
        "pool": type(pool).__name__,
        "views_inside": [start <= t.data_ptr() < end for t in runner.kv_caches],
    }


class PreemptionCounter:
    """Counts the scheduler's preemptions (vllm 0.32 `Scheduler._preempt_request`, wrapped on the instance)."""

    def __init__(self, llm: LLM):
        core = getattr(llm.llm_engine.engine_core, "engine_core", None)
        self.count = 0
        if core is None:  # the engine core runs in another process: not counted (-1)
            self.count = -1
            return
        scheduler = core.scheduler
        stock = scheduler._preempt_request

        def preempt(*args, **kwargs):
            self.count += 1
            return stock(*args, **kwargs)

        scheduler._preempt_request = preempt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    args = parser.parse_args()
    llm = LLM(
        model=args.model_dir,
        served_model_name="tiny-llama",
        dtype="float32",
        block_size=32,  # the CPU attention backend wants a multiple of 32
        max_model_len=512,
        max_num_seqs=args.max_num_seqs,
        # A fixed KV size for vLLM's own cache: on CPU, vLLM otherwise reserves
        # gpu_memory_utilization (0.9) of the machine's memory and refuses to start when other
        # processes use more than 10% of it (vllm 0.32 v1/worker/cpu_worker.py). With kvmem the
        # size is kvmem's budget instead.
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=True,
        seed=0,
    )
    counter = PreemptionCounter(llm)
    print(json.dumps({"ready": True, "kvmem": kvmem_report(llm)}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        if command["op"] == "report":
            print(json.dumps({"kvmem": kvmem_report(llm)}), flush=True)
            continue
        params = SamplingParams(temperature=0.0, max_tokens=command.get("new_tokens", 16), ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in command["prompts"]], params, use_tqdm=False)
        reply = {
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "cached_tokens": [o.num_cached_tokens or 0 for o in outputs],
            "preemptions": counter.count,
            "kvmem": kvmem_report(llm),
        }
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
