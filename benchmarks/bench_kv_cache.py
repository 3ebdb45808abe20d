"""Elastic KV cache: what growing costs per GB, and the idle footprint after a serving-like trace.

Geometry: Llama-3-8B-like (32 layers, 8 KV heads, head dim 128, fp16, block size 16): 32 KiB
blocks, 64 per 2 MiB page, one growth slot = 64 pages (one per layer's K and V).

1. Growth per GB, on demand (1 GiB = 512 pages = 8 slots in one `alloc`):
   - wall time on HostDevice with pages made in-process (`kvmem.local`);
   - driver calls on the fake CUDA driver with pages from a daemon whose reserve is warm, counted
     by the driver itself in the client (and, for the daemon's creations on the grow path, by its
     `pages_created_for_requests_total`: the refill of its reserve runs beside the grant and is
     counted apart), next to kvcached's pattern (one
     create, one map and one set-access per 2 MiB page: 512 of each per GB), and a modeled time
     per GB: the counts times per-call latencies from benchmarks/costs.py, i.e. those measured on a
     GPU by `make gpu-check` if benchmarks/gpu_costs.json exists (or --costs FILE), else the ones
     kvcached reports for an A100 (DESIGN §8: cuMemCreate 193 µs, cuMemMap 1.45 µs, cuMemSetAccess
     36 µs). The published figures have none for importing a page: then its count is reported and
     it is left out of the model, for kvcached as for kvmem.
2. Growth at the daemon's default settings with the cache's own growth (background thread,
   default watermarks) under an engine-like arrival of allocs (`engine_like_growth`): requests
   admitted in scheduler steps, as `vllm serve` admits them (`arrivals_steps`), 2 GiB live first,
   each model's first request once the daemon has made the first burst it keeps for a starting
   engine (vllm serve compiles and captures its graphs between its KV cache's allocation and its
   first request); then, labelled, the same from the moment the engine attaches, with allocs
   1 ms apart (`arrivals_1ms`, a demand far above what an engine's compute makes) and a larger
   run (--larger-gib, 4 GiB) in which growth goes on after the first steps. The best case of 1. is labelled as such.
3. Idle footprint: requests of random length (seeded) arrive and finish, each holding one block
   per 16 tokens; at the end the cache's mapped bytes are compared with the packed floor (the
   slots the live blocks would fill if packed), after the background thread has settled.

    python benchmarks/bench_kv_cache.py [--costs FILE] [--out FILE] [--larger-gib N] [--update-readme]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import costs as call_costs  # noqa: E402
from benchmarks.common import load, machine, publish  # noqa: E402

GEOMETRY = {"num_layers": 32, "block_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}
GIB_BLOCKS = 8 * 64  # 1 GiB of KV = 8 slots of 64 blocks


def growth_on_host(repeats: int) -> dict:
    import kvmem

    times = []
    for _ in range(repeats):
        with kvmem.local(device="host", budget="3GiB") as session:
            cache = session.kv_cache(**GEOMETRY, max_tokens=2 * GIB_BLOCKS * 16, background=False)
            t0 = time.perf_counter()
            ids = cache.alloc(GIB_BLOCKS)
            times.append(time.perf_counter() - t0)
            cache.free(ids)
    times.sort()
    return {"wall_s_per_gib_p50": round(times[len(times) // 2], 4), "repeats": repeats}


class QuietSpell:
    """The clock the cache's growth reads (`kvmem.cache.growth.clock`) moved 100 s on: the best case's
    one alloc comes as a lone request after a quiet spell, so the cache maps the 8 slots it needs and
    nothing ahead (an alloc within a burst maps the slots the burst's rate fills too)."""

    def __enter__(self):
        from kvmem.cache import growth

        self._growth, self._clock = growth, growth.clock
        growth.clock = lambda: self._clock() + 100.0
        return self

    def __exit__(self, *exc) -> None:
        self._growth.clock = self._clock


def growth_on_fake_with_daemon(fake, costs: call_costs.CallCosts) -> dict:
    import kvmem
    from tests.daemon_support import DaemonProcess, wait_for

    with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
        runtime_dir = Path(tmp) / "rt"
        with DaemonProcess(runtime_dir, "cuda", "3GiB", "--reserve", "1", "600", "--release-after", "600") as daemon:
            wait_for(lambda: daemon.status().daemon.pages_free_clean >= 600, timeout=120, what="a warm reserve")
            with kvmem.connect("bench", runtime_dir=runtime_dir) as session:
                cache = session.kv_cache(**GEOMETRY, max_tokens=2 * GIB_BLOCKS * 16, background=False)
                daemon_before = daemon.counters()
                before = after_a_heartbeat(daemon)
                fake.reset_call_counters()
                with QuietSpell():
                    t0 = time.perf_counter()
                    ids = cache.alloc(GIB_BLOCKS)
                    wall = time.perf_counter() - t0
                client = {k: v for k, v in fake.counters().items() if v and not k.startswith("live.")}
                daemon_after = daemon.counters()
                after = after_a_heartbeat(daemon)
                cache.free(ids)
    # On the grow path: the pages the daemon made while the GROW waited. (Its reserve, raised by this
    # GROW, is refilled in the background meanwhile: those creations are counted apart.)
    daemon_creates = after.pages_created_for_requests_total - before.pages_created_for_requests_total
    calls = {
        "cuMemCreate": client.get("cuMemCreate", 0) + daemon_creates,
        "cuMemMap": client.get("cuMemMap", 0),
        "cuMemSetAccess": client.get("cuMemSetAccess", 0),
        "cuMemImportFromShareableHandle": client.get("cuMemImportFromShareableHandle", 0),
    }
    kvcached = call_costs.kvcached_calls(512)
    run = 512 // calls["cuMemSetAccess"] if calls["cuMemSetAccess"] else 1  # pages one set-access covers
    modeled = call_costs.modeled_ms(calls, costs, set_access_run=run)
    modeled_kvcached = call_costs.modeled_ms(kvcached, costs)
    return {
        "wall_s_per_gib": round(wall, 4),
        "calls_per_gib": calls,
        "imports_per_gib": calls["cuMemImportFromShareableHandle"],
        "daemon_creates_on_grow_path": daemon_creates,
        "daemon_creates_meanwhile": daemon_after["cuMemCreate"] - daemon_before["cuMemCreate"],
        "kvcached_calls_per_gib": kvcached,
        "modeled_costs": {"source": costs.source, "measured": costs.measured, "us_per_call": costs.us},
        "modeled_ms_per_gib": round(modeled, 2),
        "modeled_ms_per_gib_kvcached": round(modeled_kvcached, 2),
        "modeled_ratio_kvcached_over_kvmem": round(modeled_kvcached / modeled, 1) if modeled else None,
        "set_access_fraction_of_kvcached": round(calls["cuMemSetAccess"] / 512, 4),
    }


def after_a_heartbeat(daemon):
    """The daemon's status header once a heartbeat has followed this call (the pool's counters reach the
    status segment at the next heartbeat, within 0.5 s)."""
    beat = daemon.status().daemon.heartbeat_ns
    while (head := daemon.status().daemon).heartbeat_ns == beat:
        time.sleep(0.01)
    return head


def arrivals_1ms(rng: random.Random, blocks_wanted: int):
    """Allocs of 1-64 blocks, 1 ms apart, until `blocks_wanted`: (blocks, pause after)."""
    used = 0
    while used < blocks_wanted:
        n = min(rng.randint(1, 64), blocks_wanted - used)
        used += n
        yield n, 0.001


# A scheduler step of `vllm serve` on an H100/H200 admits up to 8192 tokens (vLLM 0.32's default
# max_num_batched_tokens for an OpenAI server on a GPU of 70 GiB or more, vllm/engine/arg_utils.py);
# its compute is modeled from the FLOPs of those tokens: 2 x 8.03e9 per token (Llama-3-8B's
# parameters), at half of an H100 SXM's 989 TFLOPS dense BF16 (NVIDIA's datasheet): 0.27 s for a
# full step, 30.8k tokens per second.
STEP_TOKENS = 8192
STEP_S_PER_TOKEN = 2 * 8.03e9 / (0.5 * 989e12)


def arrivals_steps(rng: random.Random, blocks_wanted: int):
    """Requests of 1-64 blocks (16-1024 tokens) admitted step by step: each step's allocs back to
    back up to `STEP_TOKENS`, then the step's modeled compute: (blocks, pause after)."""
    used = 0
    while used < blocks_wanted:
        step: list[int] = []
        tokens = 0
        while used < blocks_wanted:
            n = min(rng.randint(1, 64), blocks_wanted - used)
            if step and tokens + 16 * n > STEP_TOKENS:
                break
            step.append(n)
            tokens += 16 * n
            used += n
        for n in step[:-1]:
            yield n, 0.0
        yield step[-1], tokens * STEP_S_PER_TOKEN


ARRIVALS = {"steps": arrivals_steps, "1ms": arrivals_1ms}


def engine_like_growth(
    fake,
    costs: call_costs.CallCosts,
    gib: int,
    seed: int,
    reserve: list[str],
    arrivals: str = "steps",
    start: str = "warm",
) -> dict:
    """Default settings, the cache's own growth: two models in turn grow by `gib` GiB each.

    The daemon runs with `reserve` (empty: its defaults), the cache with its background thread and
    default watermarks. `start`: "warm", each model's requests begin once the daemon's reserve,
    sized for the engine that attached (its first burst), is made, as `vllm serve` serves only
    after compiling and capturing its CUDA graphs, which follows the KV cache's allocation (vLLM
    0.32's EngineCore._initialize_kv_caches: initialize_from_config, then compile_or_warm_up_model);
    how long the daemon took is reported. "at_attach": from the moment the cache is made, with
    no start-up between (the worst case). Requests arrive as `arrivals` says (`ARRIVALS`: in
    scheduler steps, or 1 ms apart) until `gib` GiB of blocks are live. Model A grows first,
    frees everything and closes; then model B grows the same way on the pages A gave back, which
    must be zeroed before B may see them (pages changing model); B starts once the daemon has zeroed
    them in the background (how long that took is reported). Counted per GiB mapped: the driver
    calls in the engine (fake driver, this process) and the daemon's page creations (all of them,
    and those made while a GROW waited: `pages_created_for_requests_total`) and zeroings (its status
    counters, read after a heartbeat that follows the last alloc), GROWs denied, pages granted per
    page kept, the cache's growths, and how long allocs waited: all of them, and those that found
    enough mapped free blocks when they were called (which must not wait on the daemon). And the
    pages the daemon made per second while the model grew: on this machine a page costs what the
    kernel (and under a VM, the hypervisor) takes to provide 2 MiB of fresh memory, not a GPU's
    cuMemCreate, and a cold start's growth depends on it.
    """
    import kvmem
    from tests.daemon_support import DaemonProcess

    arrive = ARRIVALS[arrivals]
    blocks_wanted = gib * GIB_BLOCKS
    phases = {}
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
        runtime_dir = Path(tmp) / "rt"
        with DaemonProcess(runtime_dir, "cuda", f"{2 * gib + 1}GiB", *reserve) as daemon:
            time.sleep(0.5)  # the reserve fills as it would before the first engine arrives
            for model in ("a", "b"):
                if model == "b":  # A's engine left: its pages are zeroed ahead, in the background
                    t0 = time.perf_counter()
                    while time.perf_counter() - t0 < 60 and (
                        (h := daemon.status().daemon).pages_free_dirty or h.pages_free < h.pages_created
                    ):
                        time.sleep(0.01)
                    zeroing_s = time.perf_counter() - t0
                rng = random.Random(seed)
                after_a_heartbeat(daemon)
                before = daemon.status()
                daemon_before = daemon.counters()
                fake.reset_call_counters()
                waits = []
                waits_found_free = []  # allocs that found enough mapped free blocks
                with kvmem.connect(model, runtime_dir=runtime_dir) as session:
                    cache = session.kv_cache(**GEOMETRY, max_tokens=4 * blocks_wanted * 16)
                    waited_for_reserve = wait_for_first_burst(daemon, cache) if start == "warm" else 0.0
                    reserve_at_start = daemon.status().daemon
                    created_at_start = daemon.counters()["cuMemCreate"]
                    live: list[list[int]] = []
                    t_start = time.perf_counter()
                    for n, pause in arrive(rng, blocks_wanted):
                        found_free = cache.get_num_free_blocks() >= n
                        t0 = time.perf_counter()
                        live.append(cache.alloc(n))
                        waits.append(time.perf_counter() - t0)
                        if found_free:
                            waits_found_free.append(waits[-1])
                        if pause:
                            time.sleep(pause)
                    wall = time.perf_counter() - t_start
                    created_while_growing = daemon.counters()["cuMemCreate"] - created_at_start
                    client = {k: v for k, v in fake.counters().items() if v and not k.startswith("live.")}
                    stats = cache.stats()
                    mapped_pages = stats.pages_held
                    used_blocks = cache.get_num_used_blocks()
                    after_a_heartbeat(daemon)
                    after = daemon.status()
                    for ids in live:
                        cache.free(ids)
                daemon_after = daemon.counters()
                model_after = after.model(model)
                mapped_gib = mapped_pages / 512
                waits.sort()
                phases[model] = {
                    "load": load()[0],
                    "waited_for_reserve_s": round(waited_for_reserve, 3),
                    "reserve_at_start_pages": [reserve_at_start.reserve_low_pages, reserve_at_start.reserve_high_pages],
                    "free_clean_at_start_pages": reserve_at_start.pages_free_clean,
                    "mapped_pages": mapped_pages,
                    "wall_s": round(wall, 3),
                    "calls_per_gib": {
                        name: round(client.get(name, 0) / mapped_gib, 1)
                        for name in ("cuMemMap", "cuMemSetAccess", "cuMemImportFromShareableHandle")
                    },
                    "daemon_creates_per_gib": round(
                        (daemon_after["cuMemCreate"] - daemon_before["cuMemCreate"]) / mapped_gib, 1
                    ),
                    "daemon_creates_per_s_while_growing": round(created_while_growing / wall, 1),
                    "daemon_creates_while_a_grow_waited_per_gib": round(
                        (after.daemon.pages_created_for_requests_total - before.daemon.pages_created_for_requests_total)
                        / mapped_gib,
                        1,
                    ),
                    "daemon_zeroed_per_gib": round(
                        (after.daemon.pages_scrubbed_total - before.daemon.pages_scrubbed_total) / mapped_gib, 1
                    ),
                    "grows_denied": after.daemon.denies - before.daemon.denies,
                    "pages_granted_per_page_kept": round(model_after.pages_granted_total / mapped_pages, 2),
                    "growths": stats.grows,
                    "mapped_slots": stats.mapped_slots,
                    "live_gib": round(used_blocks / GIB_BLOCKS, 3),
                    "set_access_per_live_gib": round(client.get("cuMemSetAccess", 0) * GIB_BLOCKS / used_blocks, 1),
                    "allocs": len(waits),
                    "allocs_waiting_over_10ms": sum(w > 0.01 for w in waits),
                    "allocs_finding_free_blocks": len(waits_found_free),
                    "allocs_finding_free_blocks_wait_max_ms": round(max(waits_found_free, default=0) * 1e3, 2),
                    "alloc_wait_p99_ms": round(waits[int(0.99 * (len(waits) - 1))] * 1e3, 2),
                    "alloc_wait_max_ms": round(waits[-1] * 1e3, 2),
                }
                calls = {
                    "cuMemCreate": phases[model]["daemon_creates_per_gib"],
                    "cuMemMap": phases[model]["calls_per_gib"]["cuMemMap"],
                    "cuMemSetAccess": phases[model]["calls_per_gib"]["cuMemSetAccess"],
                }
                run = 512 / calls["cuMemSetAccess"] if calls["cuMemSetAccess"] else 1
                phases[model]["modeled_ms_per_gib"] = round(
                    call_costs.modeled_ms(calls, costs, set_access_run=round(run)), 2
                )
                phases[model]["set_access_fraction_of_kvcached"] = round(calls["cuMemSetAccess"] / 512, 4)
    phases["b"]["waited_for_background_zeroing_s"] = round(zeroing_s, 3)
    return {"reserve_args": reserve or "defaults", "arrivals": arrivals, "start": start, "gib": gib, "phases": phases}


def wait_for_first_burst(daemon, cache) -> float:
    """Wait until the daemon's reserve is raised for `cache`'s first burst (its LAYOUT arrived) and
    made, as it is before `vllm serve`'s first request; how long that took (seconds)."""
    from kvmem.cache.growth import MAX_BURST

    burst = MAX_BURST * cache.pages_per_growth
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 120 and (
        (h := daemon.status().daemon).reserve_low_pages < burst or h.pages_free_clean < h.reserve_low_pages
    ):
        time.sleep(0.01)
    return time.perf_counter() - t0


def idle_footprint(seed: int, steps: int) -> dict:
    import kvmem
    from tests.daemon_support import wait_for

    rng = random.Random(seed)
    with kvmem.local(device="host", budget="4GiB") as session:
        cache = session.kv_cache(**GEOMETRY, max_tokens=4 * GIB_BLOCKS * 16)
        live: list[list[int]] = []
        for _ in range(steps):
            if live and (rng.random() < 0.45 or cache.get_num_used_blocks() > 3 * GIB_BLOCKS):
                cache.free(live.pop(rng.randrange(len(live))))
            else:
                tokens = rng.randint(16, 4096)  # prompt plus output of one request
                live.append(cache.alloc(-(-tokens // 16)))
        used = cache.get_num_used_blocks()
        floor_slots = -(-used // cache.blocks_per_slot)
        wait_for(lambda: cache.get_num_free_blocks() - cache.high_watermark < cache.blocks_per_slot, timeout=30)
        time.sleep(0.3)  # let the background thread settle
        stats = cache.stats()
    return {
        "requests_live": len(live),
        "used_blocks": used,
        "packed_floor_slots": floor_slots,
        "mapped_slots": stats.mapped_slots,
        "footprint_over_floor": round(stats.mapped_slots / floor_slots, 3),
        "high_watermark_blocks": cache.high_watermark,
    }


def table(result: dict) -> str:
    host, fake, idle = result["growth_host"], result["growth_fake_daemon"], result["idle_footprint"]
    engine = result["growth_engine_like_default"]
    a, b = engine["phases"]["a"], engine["phases"]["b"]
    c = fake["calls_per_gib"]
    source = fake["modeled_costs"]["source"]
    imports_modeled = "cuMemImportFromShareableHandle" in fake["modeled_costs"]["us_per_call"]

    def row(label: str, key: str) -> str:
        return f"| {label} | {a[key]} | {b[key]} |"

    def compact(run: dict, title: str) -> list[str]:
        ra, rb = run["phases"]["a"], run["phases"]["b"]
        return [
            "",
            title,
            "",
            "| per GiB of KV, default settings | model A (fresh pages) | model B (pages from A) |",
            "|---|---|---|",
            f"| cuMemSetAccess per GiB mapped (kvcached: 512) | {ra['calls_per_gib']['cuMemSetAccess']} | "
            f"{rb['calls_per_gib']['cuMemSetAccess']} |",
            f"| growths (slots mapped) | {ra['growths']} ({ra['mapped_slots']}) | "
            f"{rb['growths']} ({rb['mapped_slots']}) |",
            f"| pages created while a GROW waited, per GiB | {ra['daemon_creates_while_a_grow_waited_per_gib']} | "
            f"{rb['daemon_creates_while_a_grow_waited_per_gib']} |",
            f"| pages the daemon made per second while the model grew | {ra['daemon_creates_per_s_while_growing']} | "
            f"{rb['daemon_creates_per_s_while_growing']} |",
            f"| allocs waiting > 10 ms | {ra['allocs_waiting_over_10ms']} of {ra['allocs']} | "
            f"{rb['allocs_waiting_over_10ms']} of {rb['allocs']} |",
            f"| alloc wait p99 / max, ms | {ra['alloc_wait_p99_ms']} / {ra['alloc_wait_max_ms']} | "
            f"{rb['alloc_wait_p99_ms']} / {rb['alloc_wait_max_ms']} |",
        ]

    others = []
    if (cold := result.get("growth_engine_like_at_attach")) is not None:
        others += compact(
            cold,
            "**From the moment the engine attaches** (labelled worst case: the same default settings and "
            "scheduler steps, the first request right after the cache is made, before the daemon has made "
            "the engine's first burst, so that its growth waits for pages being made):",
        )
    if (spaced := result.get("growth_engine_like_1ms")) is not None:
        others += compact(
            spaced,
            f"**Allocs 1 ms apart** (labelled: the same default settings, requests of 1-64 blocks 1 ms apart "
            f"until {spaced['gib']} GiB are live, about 17 times the modeled prefill's demand; the pattern of "
            "the figures before commit `2e31843`):",
        )
    if (larger := result.get("growth_engine_like_larger")) is not None:
        others += compact(
            larger,
            f"**Larger growth** (labelled: the same default settings and scheduler steps until {larger['gib']} "
            "GiB are live, so that growth goes on after the first steps):",
        )

    return "\n".join(
        [
            f"**Default settings** (daemon's default reserve, the cache's background growth and default "
            f"watermarks, engine-like arrivals: requests of 1-64 blocks admitted in scheduler steps of up to "
            f"{STEP_TOKENS} tokens, each step's allocs one after another, then its modeled compute, "
            f"{STEP_S_PER_TOKEN * STEP_TOKENS * 1e3:.0f} ms for a full step, until {engine['gib']} GiB are "
            "live). Model A grows first on fresh pages, then B grows on the pages A gave back (they change "
            "model, so each is zeroed before B gets it: B starts once the daemon has zeroed them in the "
            f"background, which took {b['waited_for_background_zeroing_s']} s). Each model's first request "
            "comes once the daemon has made the first burst it keeps for an engine that attached "
            f"({a['reserve_at_start_pages'][0]} pages for A, made in {a['waited_for_reserve_s']} s here; "
            "1024 cuMemCreate calls, 0.2 s at kvcached's A100 figure), as `vllm serve` serves only after "
            "compiling and capturing its CUDA graphs, which follow its KV cache's allocation. Per GiB mapped:",
            "",
            "| per GiB of KV, default settings | model A (fresh pages) | model B (pages from A) |",
            "|---|---|---|",
            f"| cuMemSetAccess (kvcached: 512) | {a['calls_per_gib']['cuMemSetAccess']} | "
            f"{b['calls_per_gib']['cuMemSetAccess']} |",
            f"| cuMemSetAccess per GiB live (the blocks in use, not the slots mapped) | "
            f"{a['set_access_per_live_gib']} | {b['set_access_per_live_gib']} |",
            f"| growths (slots mapped) | {a['growths']} ({a['mapped_slots']}) | {b['growths']} ({b['mapped_slots']}) |",
            f"| cuMemMap (kvcached: 512) | {a['calls_per_gib']['cuMemMap']} | {b['calls_per_gib']['cuMemMap']} |",
            row(
                "pages created by the daemon while a GROW waited (grant path)",
                "daemon_creates_while_a_grow_waited_per_gib",
            ),
            row("pages created by the daemon meanwhile (with the reserve's refill)", "daemon_creates_per_gib"),
            row("pages zeroed by the daemon meanwhile", "daemon_zeroed_per_gib"),
            row("GROWs denied", "grows_denied"),
            row("pages granted per page kept mapped", "pages_granted_per_page_kept"),
            row("pages the daemon made per second while the model grew", "daemon_creates_per_s_while_growing"),
            f"| allocs waiting > 10 ms | {a['allocs_waiting_over_10ms']} of {a['allocs']} | "
            f"{b['allocs_waiting_over_10ms']} of {b['allocs']} |",
            f"| alloc wait p99 / max, ms | {a['alloc_wait_p99_ms']} / {a['alloc_wait_max_ms']} | "
            f"{b['alloc_wait_p99_ms']} / {b['alloc_wait_max_ms']} |",
            f"| allocs that found mapped free blocks: how many, max wait ms | {a['allocs_finding_free_blocks']}, "
            f"{a['allocs_finding_free_blocks_wait_max_ms']} | {b['allocs_finding_free_blocks']}, "
            f"{b['allocs_finding_free_blocks_wait_max_ms']} |",
            f"| modeled driver time, ms per GiB (creations counted; {source}) | {a['modeled_ms_per_gib']} | "
            f"{b['modeled_ms_per_gib']} |",
            *others,
            "",
            "**Best case** (one `alloc` of 1 GiB = 8 slots at once, a daemon started with `--reserve 1 600` and "
            "its reserve warm; no background growth):",
            "",
            "| per GiB of KV (Llama-3-8B geometry), best case | kvmem | kvcached's pattern |",
            "|---|---|---|",
            f"| cuMemCreate on the grow path | {c['cuMemCreate']} | 512 |",
            f"| cuMemMap | {c['cuMemMap']} | 512 |",
            f"| cuMemSetAccess | {c['cuMemSetAccess']} | 512 |",
            f"| cuMemImportFromShareableHandle{'' if imports_modeled else ' (not modeled)'} | "
            f"{fake['imports_per_gib']} | 0 |",
            f"| modeled time ({source}) | {fake['modeled_ms_per_gib']} ms | {fake['modeled_ms_per_gib_kvcached']} ms |",
            f"| wall time here: host device, local pages | {host['wall_s_per_gib_p50'] * 1e3:.0f} ms | |",
            f"| wall time here: fake driver, daemon pages | {fake['wall_s_per_gib'] * 1e3:.0f} ms | |",
            "",
            f"Idle footprint after {result['trace_steps']} trace steps: {idle['mapped_slots']} slots mapped for "
            f"{idle['used_blocks']} live blocks (packed floor {idle['packed_floor_slots']} slots): "
            f"{idle['footprint_over_floor']:.2f}x the floor (kvcached reports 1.4x).",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--costs",
        type=Path,
        help="per-call costs measured by make gpu-check (default: "
        "benchmarks/gpu_costs.json if it exists, else kvcached's published A100 figures)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_kv_cache.json")
    parser.add_argument(
        "--larger-gib",
        type=int,
        default=4,
        help="GiB live in the labelled larger-growth run of the engine-like pattern (0: skip it)",
    )
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    from tests import fakecuda

    # Room for the largest budget below (2 * GiB + 1 of the larger engine-like run).
    os.environ.setdefault("FAKECUDA_CAPACITY_BYTES", str(max(8, 2 * args.larger_gib + 2) << 30))
    fake = fakecuda.load()
    os.environ.update(fakecuda.child_env())  # the daemon loads it too

    result = {
        "benchmark": "bench_kv_cache",
        "machine": machine(),
        "geometry": GEOMETRY,
        "trace_steps": args.steps,
        "growth_engine_like_default": engine_like_growth(fake, call_costs.load(args.costs), 2, seed=3, reserve=[]),
        "growth_engine_like_at_attach": engine_like_growth(
            fake, call_costs.load(args.costs), 2, seed=3, reserve=[], start="at_attach"
        ),
        "growth_engine_like_1ms": engine_like_growth(
            fake, call_costs.load(args.costs), 2, seed=3, reserve=[], arrivals="1ms"
        ),
        "growth_engine_like_larger": (
            engine_like_growth(fake, call_costs.load(args.costs), args.larger_gib, seed=3, reserve=[])
            if args.larger_gib
            else None
        ),
        "growth_host": growth_on_host(args.repeats),
        "growth_fake_daemon": growth_on_fake_with_daemon(fake, call_costs.load(args.costs)),
        "idle_footprint": idle_footprint(seed=1, steps=args.steps),
    }
    result["load_at_end"] = load()
    publish(result, args.out, table(result), f"{args.steps} trace steps" if args.update_readme else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
