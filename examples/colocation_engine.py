"""One engine of the colocation demo: a tiny random-weight HF model serving requests on kvmem blocks.

Design note
-----------
The engine is a process of its own, as a real serving engine would be. It builds a tiny
random-weight model on the spot (a Llama or a Qwen2, float32, seeded so every run is the same),
connects to kvmemd (`kvmem.connect`), opens one `ElasticKVCache` for the model and runs each
request through ``model.generate`` with a `KvmemCache` on it ("kvmem_paged" attention, which reads
the blocks in place). Requests and replies are JSON lines on stdin and stdout; a reader thread
queues requests and the main loop serves them one at a time.

Prefix cache. A request may name a prefix (``"prefix": key``): a deterministic prompt of
``prefix_tokens`` tokens (a whole number of blocks) before its own ``suffix_tokens``. The first
time, the whole prompt is computed and the prefix's blocks are kept (`KvmemCache.take_prefix`);
later requests with the same prefix start on those blocks (`borrow_prefix`) and compute only the
suffix. Each reply says how many prompt tokens were computed, which blocks held the prefix and a
checksum of their K/V bytes, so a caller can tell reuse from recomputation. Entries are evicted
least recently used first when an allocation fails for lack of memory, and when the daemon wants
the model smaller than it is (a lowered limit: the status segment's ``target_pages``).

Sleep and wake (`Session.on_sleep` / `on_wake`). The sleep hook is the drain: it closes
admission (a flag the request loop checks under a lock; requests that arrive while it is closed
wait in a queue) and waits until no request runs. With offload the prefix blocks stay allocated
(the daemon keeps their bytes in its host tier); without, they are freed. The wake hook reopens
admission; if the offloaded cache was lost, the prefix cache is forgotten (its blocks are gone).
Both hooks also print an event line.

    python examples/colocation_engine.py --model NAME --arch llama|qwen2 --runtime-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

import kvmem
from kvmem.cache import KVCacheFull
from kvmem.common.runtime import DaemonPaths
from kvmem.common.status import StatusReader
from kvmem.integrations.transformers import ATTENTION_NAME, CACHE_ARGUMENT, KvmemCache
from kvmem.integrations.transformers.cache import model_geometry

BLOCK_SIZE = 16
VOCAB = 1024
# Tiny, but with wide K/V rows so that a few thousand tokens fill several 2 MiB pages.
ARCHS: dict[str, dict[str, int]] = {
    "llama": {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8},
    "qwen2": {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4},
}


def build_model(arch: str) -> torch.nn.Module:
    """A seeded random-weight model of `arch`, float32, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(
        vocab_size=VOCAB,
        intermediate_size=1024,
        num_hidden_layers=2,
        max_position_embeddings=8192,
        dtype="float32",
        **ARCHS[arch],
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def tokens(seed: str, n: int) -> list[int]:
    """`n` deterministic token ids for the text `seed` (the same on every run and in every process)."""
    gen = torch.Generator().manual_seed(sum(ord(c) * 131**i for i, c in enumerate(seed)) % (2**62))
    return torch.randint(1, VOCAB, (n,), generator=gen).tolist()


class Engine:
    """The request loop, the prefix cache and the sleep/wake hooks of one model."""

    def __init__(self, model_name: str, arch: str, runtime_dir: str):
        self.name = model_name
        self.model = build_model(arch)
        self.session = kvmem.connect(model=model_name, runtime_dir=runtime_dir)
        layers, kv_heads, head_dim = model_geometry(self.model.config)
        self.kv = self.session.kv_cache(layers, BLOCK_SIZE, kv_heads, head_dim, torch.float32, max_tokens=65_536)
        self.device = self.kv.k[0].device  # the daemon's device: a GPU's memory, or host memory
        self.model.to(self.device)
        self.status = StatusReader(DaemonPaths.resolve(runtime_dir).shm_name)
        self.prefixes: OrderedDict[str, tuple[list[int], int]] = OrderedDict()  # key -> (blocks, tokens), LRU first
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.held: list[dict[str, Any]] = []  # requests that arrived while admission was closed
        self.state = threading.Condition()
        self.admitting = True
        self.busy = False
        self.out_lock = threading.Lock()
        self.evictions = 0
        self.session.on_sleep(self._drain)
        self.session.on_wake(self._resume)

    # ---- output ----

    def emit(self, message: dict[str, Any]) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    # ---- sleep and wake hooks (run on the cache's background thread) ----

    def _drain(self, offload: bool) -> None:
        with self.state:
            self.admitting = False
            self.state.wait_for(lambda: not self.busy)
            if not offload:
                self._evict_all()
        self.emit({"event": "sleep", "offload": offload, "prefixes": len(self.prefixes)})

    def _resume(self, restored: bool) -> None:
        with self.state:
            if not restored:
                self.prefixes.clear()  # the cache freed every block: the ids mean nothing now
            self.admitting = True
            self.state.notify_all()
        self.inbox.put({"op": "_admit"})  # wake the loop so held requests run
        self.emit({"event": "wake", "restored": restored, "prefixes": len(self.prefixes)})

    # ---- prefix cache ----

    def _evict_one(self) -> bool:
        if not self.prefixes:
            return False
        _, (blocks, _) = self.prefixes.popitem(last=False)
        self.kv.free(blocks)
        self.evictions += 1
        return True

    def _evict_all(self) -> None:
        while self._evict_one():
            pass

    def _fit_target(self) -> None:
        """Evict prefixes while the daemon wants this model smaller than it is (a lowered limit)."""
        me = self.status.snapshot().model(self.name)
        if me is not None and 0 <= me.target_pages < me.mapped_pages:
            self._evict_one()

    def _checksum(self, blocks: list[int]) -> float:
        index = torch.tensor(blocks, device=self.device)
        return float(
            sum(
                self.kv.k[i][index].double().sum() + self.kv.v[i][index].double().sum()
                for i in range(self.kv.num_layers)
            )
        )

    # ---- requests ----

    def serve(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request; on lack of memory evict the oldest prefix and try again."""
        while True:
            try:
                return self._generate(request)
            except KVCacheFull as exc:
                if not self._evict_one():
                    return {"id": request["id"], "error": str(exc)}

    def _generate(self, request: dict[str, Any]) -> dict[str, Any]:
        rows = request.get("batch", 1)
        key = request.get("prefix")
        prefix_tokens = request.get("prefix_tokens", 0)
        prompt = [tokens(f"{self.name}/{key}/{i}", prefix_tokens) if key else [] for i in range(rows)]
        prompt = [p + tokens(f"{request['suffix']}/{i}", request["suffix_tokens"]) for i, p in enumerate(prompt)]
        ids = torch.tensor(prompt, device=self.device)
        computed = {"tokens": 0}
        hook = self.model.register_forward_pre_hook(
            lambda _m, _a, kw: computed.__setitem__("tokens", computed["tokens"] or kw["input_ids"].numel()),
            with_kwargs=True,
        )
        hit = key is not None and key in self.prefixes
        t0 = time.perf_counter()
        with KvmemCache(self.kv, self.model.config) as cache:
            try:
                if hit:
                    self.prefixes.move_to_end(key)
                    cache.borrow_prefix(*self.prefixes[key])
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    **{CACHE_ARGUMENT: cache},
                    max_new_tokens=request["new_tokens"],
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                if key is not None and not hit:
                    self.prefixes[key] = (cache.take_prefix(prefix_tokens), prefix_tokens)
            finally:
                hook.remove()
        reply: dict[str, Any] = {
            "id": request["id"],
            "tokens": out[:, ids.shape[1] :].tolist(),
            "computed_prompt_tokens": computed["tokens"],
            "prompt_tokens": ids.numel(),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if key is not None:
            blocks = self.prefixes[key][0]
            reply.update(prefix_hit=hit, prefix_blocks=blocks, prefix_checksum=self._checksum(blocks))
        return reply

    def _handle(self, request: dict[str, Any]) -> None:
        with self.state:
            if not self.admitting:
                self.held.append(request)
                self.emit({"event": "held", "id": request["id"]})
                return
            self.busy = True
        try:
            reply = self.serve(request)
        finally:
            with self.state:
                self.busy = False
                self.state.notify_all()
        reply["evictions"] = self.evictions
        self.emit(reply)

    def run(self) -> None:
        threading.Thread(target=self._read, name="engine-stdin", daemon=True).start()
        self.emit({"event": "ready", "model": self.name, "pid": os.getpid()})
        while True:
            try:
                request = self.inbox.get(timeout=0.05)
            except queue.Empty:
                request = {"op": "_tick"}
            if request is None or request.get("op") == "exit":
                return
            with self.state:
                admitting = self.admitting
            if admitting:
                self._fit_target()
                held, self.held = self.held, []
                for waiting in held:
                    self._handle(waiting)
            if request.get("op") == "generate":
                self._handle(request)

    def _read(self) -> None:
        for line in sys.stdin:
            if line.strip():
                self.inbox.put(json.loads(line))
        self.inbox.put(None)  # stdin closed: the demo is gone, exit

    def close(self) -> None:
        self.status.close()
        self.session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Model name the daemon knows this engine by.")
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True)
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two engines share two cores
    engine = Engine(args.model, args.arch, args.runtime_dir)
    try:
        engine.run()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
