"""Two models share one device through kvmemd: limit, sleep with offload, wake with the prefix cache intact.

Design note
-----------
This is `make demo`: the product's story, end to end, with real processes. It starts `kvmemd` on
this machine's default device (the GPU where one is usable, else host memory) in a private
runtime directory, and two engines in processes of their own (`colocation_engine.py`: tiny
random-weight Llama and Qwen2 models, float32, KV caches on kvmem blocks). Operator actions go
through the real `kvctl` CLI as subprocesses and its status table is printed as things change.
A sampler thread reads the daemon's shared-memory status (`kvmem.common.status.StatusReader`) every
50 ms; the samples become a PNG plot of each model's mapped memory with the operator's actions
marked, and a JSON summary holds every outcome the story claims, for people and for
`tests/test_demo.py`.

The story:
1. Both engines serve requests whose prompts start with documents (prefixes) they keep cached.
2. ``kvctl limit llama``: the daemon wants llama smaller; the engine evicts cached prefixes until
   its mapped memory settles at or under the limit.
3. ``kvctl sleep qwen --offload``: qwen drains (its hook closes admission), its pages go to the
   daemon's host tier and back to the pool. The operator lifts llama's limit and llama serves a
   burst that needs more memory than was free while qwen was awake: it grows into qwen's pages.
4. ``kvctl wake qwen``: qwen's cache comes back into the same offsets; a request on a cached
   prefix computes only its suffix, reuses the same blocks (same ids, same K/V checksum) and
   gives the same tokens as before the sleep.
5. Everything stops; the demo checks that no process, socket or shared-memory segment is left.

    python examples/colocation.py [--device auto|cuda|host] [--budget 64MiB] [--out-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from kvmem.common.runtime import DaemonPaths
from kvmem.common.sizes import format_size, parse_size
from kvmem.common.status import StatusError, StatusReader
from kvmem.device import DEVICE_KINDS, open_device

HERE = Path(__file__).resolve().parent
ENGINE = HERE / "colocation_engine.py"
BIN = Path(sys.executable).parent
SAMPLE_S = 0.05
REPLY_TIMEOUT_S = 120.0
MIB = 1 << 20


class DemoError(Exception):
    """A step of the story did not happen as it should; the message says which."""


class EngineProc:
    """An engine process, its replies (by request id) and its events (sleep, wake, held)."""

    def __init__(self, name: str, arch: str, runtime_dir: Path):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(ENGINE), "--model", name, "--arch", arch, "--runtime-dir", str(runtime_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.messages.put(json.loads(line))
        self.messages.put(None)

    def _next(self) -> dict[str, Any]:
        try:
            message = self.messages.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            raise DemoError(f"engine {self.name} did not answer in {REPLY_TIMEOUT_S:g} s") from None
        if message is None:
            raise DemoError(f"engine {self.name} exited with {self.proc.wait()} (its stderr is above)")
        if "event" in message:
            self.events.append(message)
        else:
            self.replies[message["id"]] = message
        return message

    def wait_event(self, kind: str) -> dict[str, Any]:
        while True:
            for event in self.events:
                if event["event"] == kind and not event.get("seen"):
                    event["seen"] = True
                    return event
            self._next()

    def submit(self, **request: Any) -> int:
        rid = next(self._ids)
        self.proc.stdin.write(json.dumps({"op": "generate", "id": rid, **request}) + "\n")
        self.proc.stdin.flush()
        return rid

    def result(self, rid: int) -> dict[str, Any]:
        while rid not in self.replies:
            self._next()
        reply = self.replies.pop(rid)
        if "error" in reply:
            raise DemoError(f"engine {self.name}, request {rid}: {reply['error']}")
        return reply

    def stop(self) -> None:
        """Ask the engine to exit (it closes its session: every page goes back); kill it if it hangs."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.close()
            except OSError:
                pass  # it is already gone
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


class Sampler(threading.Thread):
    """Every 50 ms: each model's mapped bytes and state, from the daemon's status segment."""

    def __init__(self, shm_name: str, t0: float):
        super().__init__(name="status-sampler", daemon=True)
        self.reader = StatusReader(shm_name)
        self.t0 = t0
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                snap = self.reader.snapshot()
            except StatusError:
                break  # the daemon is gone
            page = snap.daemon.page_size
            self.samples.append(
                {
                    "t": time.monotonic() - self.t0,
                    "models": {m.model: (m.mapped_pages * page, m.state.name.lower()) for m in snap.models},
                }
            )
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.reader.close()

    def mapped(self, model: str) -> int:
        """The latest mapped bytes of `model` (0 if it is not attached)."""
        return self.samples[-1]["models"].get(model, (0, ""))[0] if self.samples else 0

    def peak(self, model: str, since: float, until: float) -> int:
        return max(
            (s["models"].get(model, (0, ""))[0] for s in self.samples if since <= s["t"] <= until),
            default=0,
        )


class Demo:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args = args
        self.runtime_dir = tmp / "run"
        self.paths = DaemonPaths.resolve(self.runtime_dir)
        self.t0 = time.monotonic()
        self.marks: list[tuple[float, str]] = []
        self.engines: dict[str, EngineProc] = {}
        self.sampler: Sampler | None = None
        self.daemon_pid = 0
        self.summary: dict[str, Any] = {}

    def say(self, text: str) -> None:
        print(f"\n[{time.monotonic() - self.t0:6.1f} s] {text}", flush=True)

    def kvctl(self, *words: str) -> str:
        cmd = [str(BIN / "kvctl"), "--runtime-dir", str(self.runtime_dir), *words]
        print("$ kvctl " + " ".join(words), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        out = (done.stdout + done.stderr).rstrip()
        if out:
            print(out, flush=True)
        if done.returncode != 0:
            raise DemoError(f"kvctl {' '.join(words)} failed ({done.returncode}): {out}")
        return done.stdout

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic() - self.t0, label))

    def wait_until(self, what: str, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(SAMPLE_S)

    # ---- the story ----

    def start(self) -> None:
        a = self.args
        # kvmemd serves exactly the device it is told (no silent fallback): "auto" is decided here.
        device = a.device
        if device == "auto":
            with open_device("auto") as probe:
                device = probe.kind
        self.say(f"starting kvmemd on device {device!r} with a budget of {a.budget} (runtime dir {self.runtime_dir})")
        subprocess.run(
            [str(BIN / "kvmemd"), "start", "--device", device, "--budget", a.budget,
             "--runtime-dir", str(self.runtime_dir), "--release-after", "1", "--detach"],
            check=True,
        )  # fmt: skip
        self.sampler = Sampler(self.paths.shm_name, self.t0)
        self.sampler.start()
        with StatusReader(self.paths.shm_name) as reader:
            daemon = reader.snapshot().daemon
        self.daemon_pid = daemon.daemon_pid
        self.budget = daemon.budget_pages * daemon.page_size
        self.summary["device"] = daemon.device_kind
        self.summary["budget_bytes"] = self.budget
        self.say("starting two engines (tiny random-weight Llama and Qwen2, float32) in their own processes")
        for name, arch in (("llama", "llama"), ("qwen", "qwen2")):
            self.engines[name] = EngineProc(name, arch, self.runtime_dir)
        for engine in self.engines.values():
            engine.wait_event("ready")
        self.kvctl("status")

    def traffic(self) -> None:
        a = self.args
        self.say(f"traffic: each engine answers {a.documents} questions on documents it keeps in its prefix cache")
        rids = []
        for i in range(a.documents):
            for name, tokens in (("llama", 512), ("qwen", 1024)):
                rid = self.engines[name].submit(
                    prefix=f"doc{i}", prefix_tokens=tokens, suffix=f"q{i}", suffix_tokens=32, new_tokens=a.new_tokens
                )
                rids.append((name, rid))
        for name, rid in rids:
            self.engines[name].result(rid)
        self.before = self.engines["qwen"].result(self.engines["qwen"].submit(**self.qwen_probe()))
        self.say(
            f"qwen answers a repeat question on doc0 from its prefix cache: computed "
            f"{self.before['computed_prompt_tokens']} of {self.before['prompt_tokens']} prompt tokens"
        )
        self.kvctl("status")

    def qwen_probe(self) -> dict[str, Any]:
        return {"prefix": "doc0", "prefix_tokens": 1024, "suffix": "q0", "suffix_tokens": 32, "new_tokens": 16}

    def limit(self) -> None:
        limit = parse_size(self.args.limit)
        self.say(
            f"lowering llama's limit to {format_size(limit)} (it holds {format_size(self.sampler.mapped('llama'))})"
        )
        self.mark(f"limit llama {self.args.limit}")
        self.kvctl("limit", "llama", self.args.limit)
        self.wait_until("llama to settle under its limit", lambda: self.sampler.mapped("llama") <= limit)
        time.sleep(0.5)  # and stay there
        settled = self.sampler.mapped("llama")
        self.summary["limit"] = {"limit_bytes": limit, "settled_bytes": settled, "settled": settled <= limit}
        self.say(f"llama settled at {format_size(settled)}: it evicted cached prefixes to fit")
        self.kvctl("status")

    def sleep_and_grow(self) -> None:
        a = self.args
        qwen_before = self.sampler.mapped("qwen")
        llama_before = self.sampler.mapped("llama")
        self.say(f"putting qwen to sleep with offload (it holds {format_size(qwen_before)})")
        self.mark("sleep qwen --offload")
        self.kvctl("sleep", "qwen", "--offload", "--wait")
        event = self.engines["qwen"].wait_event("sleep")
        print(f"qwen's drain hook ran: admission closed, {event['prefixes']} cached prefixes kept for offload")
        held = self.engines["qwen"].submit(**self.qwen_probe())
        self.engines["qwen"].wait_event("held")
        print("a request sent to sleeping qwen is held, not admitted")
        self.kvctl("status")
        self.say("lifting llama's limit; llama serves a burst that needs more memory than was free before")
        self.mark("limit llama none")
        self.kvctl("limit", "llama", "none")
        start = time.monotonic() - self.t0
        burst = self.engines["llama"].submit(batch=a.burst, suffix="burst", suffix_tokens=640, new_tokens=a.new_tokens)
        self.engines["llama"].result(burst)
        time.sleep(2 * SAMPLE_S)
        peak = self.sampler.peak("llama", start, time.monotonic() - self.t0)
        free_before = self.budget - qwen_before - llama_before
        self.summary["sleep"] = {
            "qwen_mapped_before_sleep": qwen_before,
            "qwen_mapped_asleep": self.sampler.peak("qwen", start, time.monotonic() - self.t0),
            "llama_mapped_before": llama_before,
            "llama_peak_while_qwen_asleep": peak,
            "free_while_qwen_awake": free_before,
            "llama_used_qwens_memory": peak - llama_before > free_before,
            "request_held_while_asleep": True,
        }
        self.say(
            f"llama grew from {format_size(llama_before)} to {format_size(peak)}: {format_size(peak - llama_before)} "
            f"more, while only {format_size(free_before)} was free with qwen awake"
        )
        self.kvctl("status")
        self.held_probe = held

    def wake(self) -> None:
        self.say("waking qwen: its cache comes back from the host tier to the same offsets")
        self.mark("wake qwen")
        self.kvctl("wake", "qwen", "--wait")
        event = self.engines["qwen"].wait_event("wake")
        after = self.engines["qwen"].result(self.held_probe)  # the held request runs once admission reopens
        same_tokens = after["tokens"] == self.before["tokens"]
        same_blocks = after["prefix_blocks"] == self.before["prefix_blocks"]
        same_bytes = after["prefix_checksum"] == self.before["prefix_checksum"]
        suffix_only = after["computed_prompt_tokens"] == self.before["computed_prompt_tokens"] < after["prompt_tokens"]
        self.summary["wake"] = {
            "restored": event["restored"],
            "prefix_hit": after["prefix_hit"],
            "computed_prompt_tokens": after["computed_prompt_tokens"],
            "prompt_tokens": after["prompt_tokens"],
            "same_tokens": same_tokens,
            "same_prefix_blocks": same_blocks,
            "same_prefix_bytes": same_bytes,
            "prefix_reused": after["prefix_hit"] and same_blocks and same_bytes and suffix_only,
            "tokens_before": self.before["tokens"],
            "tokens_after": after["tokens"],
        }
        self.say(
            f"qwen answered the held request from its restored prefix cache: computed {after['computed_prompt_tokens']}"
            f" of {after['prompt_tokens']} prompt tokens, prefix blocks {'the same' if same_blocks else 'DIFFERENT'}"
            f" with {'identical' if same_bytes else 'DIFFERENT'} K/V bytes, tokens "
            f"{'identical' if same_tokens else 'DIFFERENT'} to before the sleep"
        )
        self.kvctl("status")

    def stop(self) -> None:
        """Stop engines, sampler and daemon (whatever was started), then check nothing is left."""
        pids = [e.proc.pid for e in self.engines.values()]
        for engine in self.engines.values():
            engine.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.paths.socket.exists() or self.daemon_pid:
            subprocess.run([str(BIN / "kvmemd"), "stop", "--runtime-dir", str(self.runtime_dir)], check=False)
        if self.daemon_pid:
            pids.append(self.daemon_pid)
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        shm_left = Path("/dev/shm", self.paths.shm_name.lstrip("/")).exists()
        self.summary["pids"] = pids
        self.summary["shm_name"] = self.paths.shm_name
        self.summary["socket"] = str(self.paths.socket)
        self.summary["left_behind"] = {
            "processes": alive,
            "socket": self.paths.socket.exists(),
            "shm_segment": shm_left,
        }
        self.summary["clean"] = not alive and not self.paths.socket.exists() and not shm_left

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4.5))
        for name in self.engines:
            ts = [s["t"] for s in self.sampler.samples]
            ys = [s["models"].get(name, (0, ""))[0] / MIB for s in self.sampler.samples]
            ax.step(ts, ys, where="post", label=name)
        ax.axhline(self.budget / MIB, color="grey", linestyle=":", label="daemon budget")
        for t, label in self.marks:
            ax.axvline(t, color="black", linestyle="--", linewidth=0.8)
            ax.annotate(label, (t, ax.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_ylabel("mapped KV memory (MiB)")
        ax.set_title(f"kvmem: two models sharing one {self.summary['device']} device")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device",
        choices=DEVICE_KINDS,
        default="auto",
        help="kvmemd's device (default: auto, the GPU if usable, else host memory).",
    )
    parser.add_argument("--budget", default="64MiB", help="kvmemd's budget (default: 64MiB).")
    parser.add_argument("--limit", default="8MiB", help="The limit put on llama (default: 8MiB).")
    parser.add_argument("--out-dir", type=Path, default=HERE / "output", help="Where the plot and summary go.")
    parser.add_argument("--quick", action="store_true", help="Fewer documents and tokens (for tests).")
    args = parser.parse_args(argv)
    for option in ("budget", "limit"):
        try:
            parse_size(getattr(args, option))
        except ValueError as exc:
            raise SystemExit(f"colocation.py: --{option}: {exc}") from None  # one line, exit status 1
    args.documents, args.new_tokens, args.burst = (2, 4, 8) if args.quick else (4, 16, 8)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvmem-demo-") as tmp:
        demo = Demo(args, Path(tmp))
        failure = None
        try:
            demo.start()
            demo.traffic()
            demo.limit()
            demo.sleep_and_grow()
            demo.wake()
        except DemoError as exc:
            failure = str(exc)
        finally:
            demo.say("stopping the engines and kvmemd")
            demo.stop()
    png = args.out_dir / "colocation.png"
    if demo.sampler is not None and demo.sampler.samples:
        demo.plot(png)
    demo.summary.update(
        ok=failure is None, error=failure, plot=str(png), marks=[{"t": round(t, 3), "label": m} for t, m in demo.marks]
    )
    summary_path = args.out_dir / "colocation.json"
    summary_path.write_text(json.dumps(demo.summary, indent=2) + "\n")
    left = demo.summary["left_behind"]
    print(f"nothing left behind: {demo.summary['clean']} (processes {left['processes']}, socket {left['socket']}, "
          f"shared memory {left['shm_segment']})")  # fmt: skip
    print(f"plot of each model's mapped memory: {png}")
    print(f"summary (JSON): {summary_path}")
    if failure is not None:
        print(f"colocation demo failed: {failure}", file=sys.stderr)
        return 1
    return 0 if demo.summary["clean"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
