"""`kvctl sleep` and `wake` of an SGLang engine: kvmem's drain on SGLang's real scheduler code.

Needs SGLang (`make test-sglang`). SGLang's engine does not start here (no CPU sgl_kernel), and its
`Scheduler` cannot be constructed without a model runner, so each test builds one with
`Scheduler.__new__` and gives it the state its own methods read, made of SGLang's classes: its
running status, chunked-prefill and diffusion state from its own `init_*` methods, a real
`RadixCache` and `ReqToTokenPool` over kvmem's pool and allocator, its metrics reporter, KV-events
publisher and grammar manager, and running requests prepared by `ScheduleBatch.prepare_for_extend`
as its prefill does. What runs is SGLang's: `ingest_requests` (wrapped by kvmem), `pause_generation`,
`flush_cache`, `continue_generation`, the retraction and the radix cache. Set by hand: the
configuration flags that select SGLang's plain path (no overlap, disaggregation, hierarchical cache,
priorities, drafts or external corpus), one-rank process groups, and a request receiver with no
incoming requests. The daemon is a real kvmemd
process and the operator's commands are real `kvctl` runs.

Geometry as in test_integration_sglang.py: 32-token SGLang pages of 64 KiB, 32 of them per kvmem
page slot of 4 kvmem pages (8 MiB); the daemon's budget is 3 slots.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import types
from array import array
from pathlib import Path

import pytest

pytest.importorskip(
    "sglang", reason="sglang is not installed: `make test-sglang` installs SGLang in .venv-sglang and runs these tests"
)
pytest.importorskip(
    "sglang.srt.managers.scheduler",
    reason="SGLang's scheduler module needs setproctitle, uvicorn and fastapi: `make test-sglang` installs them",
)

import torch
from sglang.srt.constrained.grammar_manager import GrammarManager
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, ScheduleBatch
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.managers.scheduler_components.kv_events_publisher import SchedulerKvEventsPublisher
from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.observability.metrics_collector import SchedulerMetricsCollectorContext
from sglang.srt.runtime_context import get_context, get_parallel
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.utils import TypeBasedDispatcher

import kvmem
from tests.daemon_support import DaemonProcess, wait_for
from tests.test_integration_sglang import (
    DIM,
    ELASTIC,
    HEADS,
    KVMEM_PAGES_PER_SLOT,
    LAYERS,
    PAGE,
    SIZE,
    Layer,
    make_allocator,
    make_pool,
)

KVCTL = str(Path(sys.executable).parent / "kvctl")
MODEL = "sglang-drain"
PREFIX = list(range(1000, 1000 + 2 * PAGE + 5))  # a finished request's prompt: the tree keeps 2 pages


@pytest.fixture(scope="module", autouse=True)
def sglang_runtime(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SGLang's process-wide configuration, as its launcher publishes it for a tiny Llama on CPU."""
    model = tmp_path_factory.mktemp("tiny-llama")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HEADS * DIM,
        "intermediate_size": 256,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": 2048,
        "max_position_embeddings": 1024,
        "torch_dtype": "float32",
    }
    (model / "config.json").write_text(json.dumps(config))
    get_context().set_server_args(
        ServerArgs(model_path=str(model), device="cpu", skip_tokenizer_init=True, page_size=PAGE)
    )
    # One rank of everything: the ranks SGLang's launcher stamps into each scheduler process.
    get_parallel().override_permanently(tp_rank=0, pp_rank=0, dp_rank=0, attn_dp_rank=0, attn_tp_rank=0, attn_cp_rank=0)


@pytest.fixture
def daemon(tmp_path: Path):
    with DaemonProcess(tmp_path / "rt", "host", "24MiB", "--reserve", "0", "0") as d:  # 3 slots
        yield d


def kvctl(daemon: DaemonProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KVCTL, "--runtime-dir", str(daemon.runtime_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


class Engine:
    """One SGLang scheduler over a kvmem pool from the daemon, and a thread running its loop's input
    stage (`ingest_requests`) as SGLang's event loop does on every iteration."""

    def __init__(self, runtime_dir: Path):
        self.session = kvmem.connect(MODEL, runtime_dir=runtime_dir)
        self.pool = make_pool(self.session, cache_options=ELASTIC)
        self.allocator = make_allocator(self.pool)  # installs kvmem's wrapper of ingest_requests
        self.req_to_token = ReqToTokenPool(size=8, max_context_len=1024, device="cpu", enable_memory_saver=False)
        self.tree = RadixCache(
            CacheInitParams(
                disable=False,
                req_to_token_pool=self.req_to_token,
                token_to_kv_pool_allocator=self.allocator,
                page_size=PAGE,
            )
        )
        self.scheduler = self._scheduler()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def _scheduler(self) -> Scheduler:
        s = Scheduler.__new__(Scheduler)
        s.server_args = get_context().server_args
        s.device = "cpu"
        s.tree_cache, s.req_to_token_pool, s.token_to_kv_pool_allocator = self.tree, self.req_to_token, self.allocator
        s.init_model_config()
        s.init_running_status()
        s.init_chunked_prefill()
        s.init_diffusion_llm()
        # SGLang's plain path: no overlap, disaggregation, hierarchical cache, priorities or drafts.
        for name, value in {
            "enable_overlap": False,
            "enable_overlap_mlx": False,
            "disaggregation_mode": DisaggregationMode.NULL,
            "decode_offload_manager": None,
            "hisparse_coordinator": None,
            "enable_hisparse": False,
            "enable_hierarchical_cache": False,
            "enable_hicache_storage": False,
            "enable_lmcache": False,
            "enable_priority_scheduling": False,
            "abort_on_priority_when_disabled": False,
            "max_queued_requests": None,
            "draft_worker": None,
            "external_corpus_manager": None,
            "processed_tokens_counter": 0,
            "_pause_started_at": None,
            "_pause_intervals": [],
        }.items():
            setattr(s, name, value)
        s.metrics_reporter = SchedulerMetricsReporter(
            scheduler=s,
            metrics_collector_context=SchedulerMetricsCollectorContext(
                enable_metrics=False,
                is_stats_logging_rank=False,
                current_scheduler_metrics_enabled=False,
                enable_kv_cache_events=False,
                collector=None,
            ),
            metrics_collector=None,
        )
        s.scheduler_stage_metrics = s.metrics_reporter.scheduler_stage_metrics  # as Scheduler.__init__ does
        s.kv_events_publisher = SchedulerKvEventsPublisher(
            kv_events_config=None,
            tree_cache=self.tree,
            send_metrics_from_scheduler=None,
            max_running_requests=8,
            max_total_num_tokens=SIZE,
            get_stats=lambda: s.metrics_reporter.stats,
        )
        one_rank = types.SimpleNamespace(world_size=1, first_rank=0, is_first_rank=True)
        s.dp_tp_cpu_group, s.dp_tp_group, s.pp_group = None, one_rank, one_rank
        s.grammar_manager = GrammarManager(s)
        # No requests arrive in these tests: the receiver hands back only the scheduler's own.
        s.request_receiver = types.SimpleNamespace(recv_requests=lambda local_reqs: list(local_reqs))
        return s

    # ---- requests, as SGLang's prefill makes them ----

    def prefill(self, *prompts: list[int], max_new_tokens: int = 8) -> ScheduleBatch:
        reqs = []
        for i, prompt in enumerate(prompts):
            req = Req(
                rid=f"r{len(prompt)}-{i}",
                origin_input_text="",
                origin_input_ids=array("q", prompt),
                sampling_params=SamplingParams(max_new_tokens=max_new_tokens),
            )
            req.init_next_round_input(self.tree)
            req.extend_end = len(req.full_untruncated_fill_ids)  # PrefillAdder's whole-prompt extend
            reqs.append(req)
        batch = ScheduleBatch.init_new(
            reqs,
            self.req_to_token,
            self.allocator,
            self.tree,
            self.scheduler.model_config,
            False,
            SpeculativeAlgorithm.NONE,
        )
        batch.prepare_for_extend()
        return batch

    def cache_finished(self, prompt: list[int]) -> torch.Tensor:
        """Run `prompt` to its end and let the radix tree keep its whole pages; their token slots."""
        (req,) = self.prefill(prompt, max_new_tokens=1).reqs
        slots = self.req_to_token.req_to_token[req.kv.req_pool_idx, : len(prompt)].clone()
        req.output_ids.append(7)
        req.finished_reason = FINISH_LENGTH(length=1)
        release_kv_cache(req, self.tree, checkpoint=True)
        return slots[: len(prompt) // PAGE * PAGE]

    def cached_prefix_len(self, prompt: list[int]) -> int:
        req = Req(
            rid="probe", origin_input_text="", origin_input_ids=array("q", prompt), sampling_params=SamplingParams()
        )
        req.init_next_round_input(self.tree)
        return req.prefix_len

    # ---- the loop ----

    def start(self) -> Engine:
        def loop() -> None:
            while not self._stop.wait(0.005):
                try:
                    self.scheduler.ingest_requests()
                except BaseException as exc:  # reported by the test, not lost in the thread
                    self.errors.append(exc)
                    return

        self._thread = threading.Thread(target=loop, name="sglang-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        assert not self.errors, self.errors

    def close(self) -> None:
        self.stop()
        self.pool.close()
        self.session.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_state(daemon: DaemonProcess):
    return daemon.status().model(MODEL)


def test_an_engine_is_refused_until_its_scheduler_runs_then_a_discarding_sleep_retracts_and_flushes(
    daemon: DaemonProcess,
):
    with Engine(daemon.runtime_dir) as engine:
        engine.cache_finished(PREFIX)
        running = engine.prefill(list(range(70)), list(range(100, 140)))
        engine.scheduler.running_batch = running
        assert engine.allocator.held_pages() == 2 + 3 + 2  # the tree's 2 pages, the requests' 3 and 2
        wait_for(lambda: model_state(daemon).mapped_pages == KVMEM_PAGES_PER_SLOT, what="one slot mapped")

        # No scheduler has run yet: nothing declared a drain, so the daemon refuses by name.
        refused = kvctl(daemon, "sleep", MODEL, check=False)
        assert refused.returncode != 0 and "drain" in refused.stderr
        assert model_state(daemon).state.name == "AWAKE"

        engine.start()  # the first iteration attaches kvmem's drain to the scheduler
        wait_for(lambda: getattr(engine.scheduler, "_kvmem_drain", None) is not None, what="the drain attached")
        kvctl(daemon, "sleep", MODEL, "--wait")

        state = model_state(daemon)
        assert (state.state.name, state.mapped_pages) == ("ASLEEP", 0)
        s = engine.scheduler
        assert s._engine_paused  # the loop schedules nothing while asleep
        assert s.running_batch.reqs == [] and sorted(r.rid for r in s.waiting_queue) == ["r40-1", "r70-0"]
        assert all(not r.kv.holds_kv for r in s.waiting_queue)  # retracted: they recompute after the wake
        assert engine.tree.evictable_size() == 0 and engine.cached_prefix_len(PREFIX) == 0  # discarded
        assert engine.allocator.held_pages() == 0 and not engine.pool.padding_held
        assert engine.pool.kv.stats().pages_held == 0
        assert engine.allocator.alloc(PAGE) is None  # asleep: nothing to be had

        kvctl(daemon, "wake", MODEL, "--wait")
        wait_for(lambda: not s._engine_paused, what="the scheduler to resume")
        assert engine.pool.padding_held and engine.pool.kv.get_num_used_blocks() == 1  # page 0 again
        wait_for(lambda: model_state(daemon).mapped_pages == KVMEM_PAGES_PER_SLOT, what="the padding slot back")
        again = engine.prefill(*(r.origin_input_ids.tolist() for r in s.waiting_queue))  # they run again
        assert engine.allocator.held_pages() == 3 + 2 and len(again.reqs) == 2
    wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="every page back")


def test_an_offloading_sleep_keeps_the_prefix_cache_bit_identical_and_retracts_only_the_running(
    daemon: DaemonProcess,
):
    with Engine(daemon.runtime_dir) as engine:
        cached = engine.cache_finished(PREFIX)
        keys = torch.randn(len(cached), HEADS, DIM)
        engine.pool.set_kv_buffer(Layer(1), cached, keys, 2 * keys)
        engine.scheduler.running_batch = engine.prefill(list(range(70)))
        engine.start()
        wait_for(lambda: getattr(engine.scheduler, "_kvmem_drain", None) is not None, what="the drain attached")

        kvctl(daemon, "sleep", MODEL, "--offload", "--wait")
        state = model_state(daemon)
        assert (state.state.name, state.mapped_pages) == ("ASLEEP", 0)
        s = engine.scheduler
        assert [r.rid for r in s.waiting_queue] == ["r70-0"] and not s.running_batch.reqs
        assert engine.allocator.held_pages() == 2  # the tree's pages stay allocated (in the host tier)
        assert engine.pool.padding_held

        kvctl(daemon, "wake", MODEL, "--wait")
        wait_for(lambda: not s._engine_paused, what="the scheduler to resume")
        assert engine.cached_prefix_len(PREFIX) == 2 * PAGE  # the tree is valid and its pages came back
        assert torch.equal(engine.pool.get_key_buffer(1)[cached], keys)
        assert torch.equal(engine.pool.get_value_buffer(1)[cached], 2 * keys)
    wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="every page back")


def test_a_flush_sglang_refuses_leaves_the_engine_serving_after_the_daemon_rolls_the_sleep_back(tmp_path: Path):
    with (
        DaemonProcess(tmp_path / "rt", "host", "24MiB", "--reserve", "0", "0", "--drain-timeout", "2") as daemon,
        Engine(daemon.runtime_dir) as engine,
    ):
        engine.cache_finished(PREFIX)
        # A request waiting for its grammar: SGLang's flush_cache refuses while one does.
        (waiting,) = engine.prefill(list(range(40))).reqs
        engine.scheduler.grammar_manager.grammar_queue.append(waiting)
        engine.start()
        wait_for(lambda: getattr(engine.scheduler, "_kvmem_drain", None) is not None, what="the drain attached")
        rolled_back = kvctl(daemon, "sleep", MODEL, "--wait", check=False)
        assert rolled_back.returncode == 6, rolled_back.stderr  # documented: the drain timed out
        wait_for(lambda: not engine.scheduler._engine_paused, what="the engine to run again")
        assert model_state(daemon).state.name == "AWAKE"
        assert engine.pool.padding_held and engine.cached_prefix_len(PREFIX) == 2 * PAGE  # nothing was lost

        engine.scheduler.grammar_manager.grammar_queue.clear()  # its grammar is ready: it runs, then ends
        engine.allocator.free(engine.req_to_token.req_to_token[waiting.kv.req_pool_idx, :40])
        kvctl(daemon, "sleep", MODEL, "--wait")
        assert (model_state(daemon).state.name, model_state(daemon).mapped_pages) == ("ASLEEP", 0)


def test_an_engine_the_operator_paused_stays_paused_after_the_wake(daemon: DaemonProcess):
    with Engine(daemon.runtime_dir) as engine:
        engine.scheduler.pause_generation(PauseGenerationReqInput(mode="in_place"))  # SGLang's /pause_generation
        engine.start()
        wait_for(lambda: getattr(engine.scheduler, "_kvmem_drain", None) is not None, what="the drain attached")
        kvctl(daemon, "sleep", MODEL, "--wait")
        kvctl(daemon, "wake", MODEL, "--wait")
        wait_for(lambda: engine.pool.padding_held, what="the padding page taken again")
        assert engine.scheduler._engine_paused  # kvmem resumes only what it paused


def test_an_operators_continue_while_asleep_is_paused_again_and_the_wake_resumes(
    daemon: DaemonProcess, caplog: pytest.LogCaptureFixture
):
    """SGLang's /continue_generation while kvmem has the model asleep (offloaded: the radix tree still
    points at pages now in the host tier) would let the next batch read unmapped memory. The engine
    is paused again in the iteration that handled it, and the wake resumes it, as the operator asked."""
    with Engine(daemon.runtime_dir) as engine:
        cached = engine.cache_finished(PREFIX)
        keys = torch.randn(len(cached), HEADS, DIM)
        engine.pool.set_kv_buffer(Layer(1), cached, keys, 2 * keys)
        inbox: queue.SimpleQueue = queue.SimpleQueue()

        def receive(local_reqs: list) -> list:  # the operator's HTTP requests, as SGLang's receiver hands them
            received = list(local_reqs)
            while not inbox.empty():
                received.append(inbox.get_nowait())
            return received

        s = engine.scheduler
        s.request_receiver = types.SimpleNamespace(recv_requests=receive)
        # SGLang's dispatcher, with the one control request this test sends (its full table names
        # components this scheduler is built without).
        s._request_dispatcher = TypeBasedDispatcher([(ContinueGenerationReqInput, s.continue_generation)])
        engine.start()
        wait_for(lambda: getattr(s, "_kvmem_drain", None) is not None, what="the drain attached")
        kvctl(daemon, "sleep", MODEL, "--offload", "--wait")
        assert s._engine_paused and engine.pool.kv.stats().pages_held == 0

        with caplog.at_level("WARNING", logger="kvmem.integrations.sglang.drain"):
            inbox.put(ContinueGenerationReqInput(torch_empty_cache=False))  # SGLang's /continue_generation
            wait_for(lambda: "continued while kvmem has the model asleep" in caplog.text, what="the warning")
            wait_for(lambda: s._engine_paused, what="the engine paused again")
        assert model_state(daemon).state.name == "ASLEEP"

        kvctl(daemon, "wake", MODEL, "--wait")
        wait_for(lambda: not s._engine_paused, what="the scheduler to resume")  # the operator's continue stands
        assert engine.cached_prefix_len(PREFIX) == 2 * PAGE
        assert torch.equal(engine.pool.get_key_buffer(1)[cached], keys)
    wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="every page back")


def test_tensor_parallel_schedulers_declare_no_drain_and_are_refused_by_name(daemon: DaemonProcess):
    with Engine(daemon.runtime_dir) as engine:
        engine.scheduler.tp_size = 2  # each rank would pause on its own daemon's word: not drainable
        engine.start()
        wait_for(lambda: getattr(engine.scheduler, "_kvmem_drain", None) is not None, what="the drain attached")
        assert engine.pool.kv.sleep_hooks == ()
        refused = kvctl(daemon, "sleep", MODEL, check=False)
        assert refused.returncode != 0 and MODEL in refused.stderr and "drain" in refused.stderr


def test_a_pool_closed_while_a_sleep_waits_for_the_scheduler_does_not_hang(daemon: DaemonProcess):
    engine = Engine(daemon.runtime_dir)
    engine.start()
    wait_for(lambda: getattr(engine.scheduler, "_kvmem_drain", None) is not None, what="the drain attached")
    engine.stop()  # the scheduler stops iterating: nobody will carry the sleep out
    sleeper = subprocess.Popen([KVCTL, "--runtime-dir", str(daemon.runtime_dir), "sleep", MODEL])
    try:
        wait_for(lambda: model_state(daemon).state.name == "DRAINING", what="the sleep to reach the engine")
        closer = threading.Thread(target=engine.pool.close)
        closer.start()
        closer.join(timeout=30)
        assert not closer.is_alive()  # the waiting sleep hook was let go
    finally:
        sleeper.wait(timeout=60)
        engine.session.close()
    wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="every page back")
