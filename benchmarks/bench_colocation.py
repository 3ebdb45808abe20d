"""Several models on one device under bursty traffic: static equal partitions versus kvmem elastic sharing.

Design note
-----------
The question kvcached's headline answers: how long do requests wait for their first token when
several models share one device and traffic comes in bursts? Here it is answered for kvmem, on
the same total KV memory, under the same seeded arrival trace, in one invocation (so the ratio is
same-run):

- static: each engine has its own fixed share, ``kvmem.local(device="host", budget=total / n)``;
- elastic: every engine draws pages from one kvmemd whose budget is the total (``kvmem.connect``).

Engines are simulated-compute engines, one thread each: the model's compute is a modeled time
(a fixed time per decode step for the whole batch plus a time per prompt token for prefill), but
the KV memory is real: a request is admitted only when its engine's `ElasticKVCache` allocates the
blocks of its prompt and output (``alloc`` of whole blocks, reserved at admission, as an engine
without preemption does), and frees them when it finishes. Growth, shrink and reclaim between
engines are kvmem's own, through the real daemon. Admission is first come, first served per
engine; a request that finds no memory waits in its queue (counted as "waited for memory").
Tiny HF models were not chosen: on 2 CPU cores their compute, not memory, would decide every
figure, and the answer would be about CPU matrix multiplies.

The trace: arrivals are Poisson per model; every `burst_s` seconds the burst moves to the next
model (high rate), the others trickle (low rate). Prompt and output lengths are uniform in fixed
ranges. Reported per setting: p50/p99 queueing delay (arrival to admission) and time to first
token (arrival to the end of the step that ran its prefill), output-token throughput, how many
requests waited for memory, and each engine's KV memory over time (plot).

    python benchmarks/bench_colocation.py [--engines 3] [--total 96MiB] [--duration 20] [--seed 0]
        [--out FILE] [--plot FILE] [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import load, machine, percentile, replace_readme_section, run_header, spread  # noqa: E402

# A KV geometry whose 2 MiB pages fill at a few thousand tokens: 2 layers, 8 KV heads of 64, fp16.
GEOMETRY = {"num_layers": 2, "block_size": 16, "num_kv_heads": 8, "head_dim": 64, "dtype": "float16"}
STEP_S = 0.008  # one decode step of the whole batch
PREFILL_S_PER_TOKEN = 10e-6
PROMPT = (256, 1024)
OUTPUT = (64, 192)
RATE_HIGH, RATE_LOW = 20.0, 1.0  # requests/s to the model in its burst, and to the others
BURST_S = 2.0
BIN = Path(sys.executable).parent


@dataclass
class Request:
    model: int
    arrival: float
    prompt: int
    output: int
    admitted: float = -1.0
    first_token: float = -1.0
    done: float = -1.0
    waited_for_memory: bool = False
    blocks: list[int] = field(default_factory=list)


def make_trace(engines: int, duration: float, seed: int) -> list[Request]:
    """Poisson arrivals per model (thinning against the high rate), the burst rotating every BURST_S."""
    rng = random.Random(seed)
    trace = []
    for model in range(engines):
        t = 0.0
        while True:
            t += rng.expovariate(RATE_HIGH)
            if t >= duration:
                break
            rate = RATE_HIGH if int(t // BURST_S) % engines == model else RATE_LOW
            if rng.random() < rate / RATE_HIGH:
                trace.append(Request(model, t, rng.randint(*PROMPT), rng.randint(*OUTPUT)))
    return sorted(trace, key=lambda r: r.arrival)


class Engine(threading.Thread):
    """A simulated-compute engine: real kvmem blocks per request, modeled time per step."""

    def __init__(self, index: int, session, requests: list[Request], t0: float, stop_at: float):
        super().__init__(name=f"engine-{index}", daemon=True)
        self.cache = session.kv_cache(**GEOMETRY, max_tokens=65_536, grow_wait=0.0)
        self.session = session
        self.pending = sorted(requests, key=lambda r: r.arrival)
        self.t0 = t0
        self.stop_at = stop_at
        self.memory: list[tuple[float, int]] = []
        self.tokens = 0
        self.error: BaseException | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by the main thread, which owns the sessions
            self.error = exc

    def _loop(self) -> None:
        import kvmem

        queue: list[Request] = []
        running: list[Request] = []
        produced: dict[int, int] = {}
        block = GEOMETRY["block_size"]
        while (self.pending or queue or running) and self.now() < self.stop_at:
            now = self.now()
            while self.pending and self.pending[0].arrival <= now:
                queue.append(self.pending.pop(0))
            admitted = []
            while queue:
                request = queue[0]
                try:
                    request.blocks = self.cache.alloc(-(-(request.prompt + request.output) // block))
                except kvmem.KVCacheFull:
                    request.waited_for_memory = True
                    break
                request.admitted = now
                admitted.append(queue.pop(0))
            step = STEP_S + PREFILL_S_PER_TOKEN * sum(r.prompt for r in admitted) if (running or admitted) else 0.001
            time.sleep(step)
            end = self.now()
            for request in admitted:
                request.first_token = end
                produced[id(request)] = 1
            for request in running:
                produced[id(request)] += 1
            running.extend(admitted)
            self.tokens += len(running)
            finished = [r for r in running if produced[id(r)] >= r.output]
            for request in finished:
                request.done = end
                self.cache.free(request.blocks)
            running = [r for r in running if produced[id(r)] < r.output]
            self.memory.append((end, self.cache.stats().mapped_bytes))


def run_setting(name: str, sessions: list, trace: list[Request], duration: float) -> dict:
    """Replay `trace` (fresh copies) on one engine per session; measure it."""
    requests = [Request(r.model, r.arrival, r.prompt, r.output) for r in trace]
    t0 = time.monotonic()
    engines = [Engine(i, s, [r for r in requests if r.model == i], t0, duration + 60.0) for i, s in enumerate(sessions)]
    for engine in engines:
        engine.start()
    for engine in engines:
        engine.join()
    errors = [e.error for e in engines if e.error is not None]
    if errors:
        raise errors[0]
    done = [r for r in requests if r.done >= 0]
    makespan = max(r.done for r in done)
    queueing = [r.admitted - r.arrival for r in done]
    ttft = [r.first_token - r.arrival for r in done]
    return {
        "setting": name,
        "requests": len(requests),
        "completed": len(done),
        "queueing_s_p50": round(percentile(queueing, 0.5), 4),
        "queueing_s_p99": round(percentile(queueing, 0.99), 4),
        "ttft_s_p50": round(percentile(ttft, 0.5), 4),
        "ttft_s_p99": round(percentile(ttft, 0.99), 4),
        "throughput_tokens_per_s": round(sum(e.tokens for e in engines) / makespan, 1),
        "waited_for_memory": sum(r.waited_for_memory for r in requests),
        "peak_mapped_bytes": [max((m for _, m in e.memory), default=0) for e in engines],
        "memory": [[(round(t, 3), m) for t, m in e.memory[::10]] for e in engines],
        "ttft": sorted(ttft),
    }


def static(engines: int, total: int, trace: list[Request], duration: float) -> dict:
    import kvmem

    sessions = [kvmem.local(device="host", budget=total // engines) for _ in range(engines)]
    try:
        return run_setting("static", sessions, trace, duration)
    finally:
        for session in sessions:
            session.close()


def elastic(engines: int, total: int, trace: list[Request], duration: float) -> dict:
    import kvmem

    with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
        run = Path(tmp) / "run"
        subprocess.run(
            [str(BIN / "kvmemd"), "start", "--device", "host", "--budget", str(total), "--runtime-dir", str(run),
             "--release-after", "1", "--log-level", "warning", "--detach"],
            check=True,
        )  # fmt: skip
        sessions = []
        try:
            sessions = [kvmem.connect(model=f"model-{i}", runtime_dir=run) for i in range(engines)]
            return run_setting("elastic", sessions, trace, duration)
        finally:
            for session in sessions:
                session.close()
            subprocess.run([str(BIN / "kvmemd"), "stop", "--runtime-dir", str(run)], check=True)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        ttft = result["ttft"]
        left.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=result["setting"])
    left.set_xscale("log")
    left.set_xlabel("time to first token (s)")
    left.set_ylabel("fraction of requests")
    left.set_title("TTFT, same bursty trace")
    left.legend()
    elastic_run = next(r for r in results if r["setting"] == "elastic")
    for i, series in enumerate(elastic_run["memory"]):
        right.plot([t for t, _ in series], [m / (1 << 20) for _, m in series], label=f"model-{i}")
    right.set_xlabel("seconds")
    right.set_ylabel("mapped KV memory (MiB)")
    right.set_title("elastic: each engine's memory follows its burst")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict]) -> str:
    rows = [
        "| setting | seed | load | requests | queueing p50 / p99 s | TTFT p50 / p99 s | throughput tok/s "
        "| waited for memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['setting']} | {r.get('seed', '')} | {r.get('load', '')} | {r['completed']}/{r['requests']} | "
            f"{r['queueing_s_p50']} / {r['queueing_s_p99']} | "
            f"{r['ttft_s_p50']} / {r['ttft_s_p99']} | {r['throughput_tokens_per_s']} | {r['waited_for_memory']} |"
        )
    return "\n".join(rows)


def main() -> None:
    from kvmem.common.sizes import format_size, parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, choices=(2, 3), default=3)
    parser.add_argument("--total", default="96MiB", help="KV memory of all engines together (default 96MiB).")
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds of arrivals (default 20).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="Repetitions, each a static and an elastic run (default 3)."
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_colocation.json")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "results" / "bench_colocation.png")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    try:
        total = parse_size(args.total)
    except ValueError as exc:
        parser.error(f"--total: {exc}")
    if args.duration <= 0:
        parser.error(f"--duration {args.duration:g}: it must be positive")
    m = machine()
    runs = []  # per repetition: (static, elastic), run in alternating order under the same load
    for rep in range(args.repeats):
        trace = make_trace(args.engines, args.duration, args.seed + rep)
        order = ("static", "elastic") if rep % 2 == 0 else ("elastic", "static")
        pair = {}
        for name in order:
            setting = static if name == "static" else elastic
            pair[name] = setting(args.engines, total, trace, args.duration)
            pair[name]["load"] = load()[0]
            pair[name]["seed"] = args.seed + rep
        runs.append(pair)
        print(table([pair["static"], pair["elastic"]]), flush=True)

    def ratio_spread(key: str, numerator: str, denominator: str) -> dict:
        return spread([r[numerator][key] / max(r[denominator][key], 1e-9) for r in runs])

    ratios = {
        "ttft_p99_static_over_elastic": ratio_spread("ttft_s_p99", "static", "elastic"),
        "ttft_p50_static_over_elastic": ratio_spread("ttft_s_p50", "static", "elastic"),
        "throughput_elastic_over_static": ratio_spread("throughput_tokens_per_s", "elastic", "static"),
    }
    results = [runs[0]["static"], runs[0]["elastic"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": m,
                "config": {
                    "engines": args.engines,
                    "total_bytes": total,
                    "duration_s": args.duration,
                    "seed": args.seed,
                    "geometry": GEOMETRY,
                    "step_s": STEP_S,
                    "prefill_s_per_token": PREFILL_S_PER_TOKEN,
                    "rates_per_s": [RATE_HIGH, RATE_LOW],
                    "burst_s": BURST_S,
                },
                "runs": [
                    {name: {k: v for k, v in r.items() if k not in ("memory", "ttft")} for name, r in pair.items()}
                    for pair in runs
                ],  # the memory and TTFT series are plotted (first repetition)
                "load_at_end": load(),
                "ratios": ratios,
            },
            indent=1,
        )
        + "\n"
    )
    plot(results, args.plot)
    text = table([r[name] for r in runs for name in ("static", "elastic")])
    print(text)
    print(json.dumps(ratios))
    print(f"results: {args.out}\nplot: {args.plot}")
    if args.update_readme:
        header = run_header(
            m,
            f"{args.engines} engines, {format_size(total)} of KV memory in all, {args.duration:g} s of arrivals, "
            f"{args.repeats} repetitions (seeds {args.seed}..{args.seed + args.repeats - 1}, static and elastic "
            "in alternating order)",
        )
        ratio_lines = "\n".join(
            f"- `{k}`: median {v['median']}, lowest {v['min']}, highest {v['max']} (each repetition: {v['all']})"
            for k, v in ratios.items()
        )
        replace_readme_section("bench_colocation", f"{header}\n\n{text}\n\n{ratio_lines}\n")


if __name__ == "__main__":
    main()
