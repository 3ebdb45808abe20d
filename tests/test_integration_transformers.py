"""kvmem.integrations.transformers on tiny random-weight models (Llama and Qwen2, float32, CPU).

Every comparison is exact: greedy token ids from a kvmem-backed run must equal those of
transformers' own DynamicCache (or its own continuous batching), for a batch of prompts of
different lengths, left-padded with an attention mask.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    ContinuousBatchingConfig,
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import kvmem
from kvmem.cache import KVCacheFull
from kvmem.control import ControlClient
from kvmem.device import HostDevice
from kvmem.integrations.transformers import (
    CACHE_ARGUMENT,
    SUPPORTED,
    KvmemCache,
    KvmemCacheFull,
    KvmemPagedAttentionCache,
    UnsupportedTransformersError,
    check_transformers_version,
    kvmem_continuous_batching,
)
from kvmem.integrations.transformers import version as transformers_version
from kvmem.page_source import LocalPageSource
from tests.daemon_support import DaemonProcess, wait_for

# kvmem passes the cache by the installed release's keyword (CACHE_ARGUMENT): 5.24's deprecation of
# the old one must never fire here.
pytestmark = pytest.mark.filterwarnings("error:`past_key_values` is deprecated:FutureWarning")

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [20, 21, 22],
    [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48],
]
WIDTH = max(len(p) for p in PROMPTS)  # 19 tokens: two blocks of 16 per row
NEW_TOKENS = 20


def greedy(new_tokens: int = NEW_TOKENS) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
HEAD_DIM = 16


def make_model(arch: str) -> torch.nn.Module:
    config_cls, model_cls = ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # spread logits: greedy ties between tokens would make the test about rounding
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return model_cls(config).eval()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return make_model(request.param)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return make_model("llama")


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0] * (WIDTH - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (WIDTH - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask


def generate(model: torch.nn.Module, attn: str, cache, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    model.set_attn_implementation(attn)
    ids, mask = padded_batch()
    return model.generate(ids, attention_mask=mask, generation_config=greedy(new_tokens), **{CACHE_ARGUMENT: cache})


def reference(model: torch.nn.Module, attn: str = "sdpa", new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    return generate(model, attn, DynamicCache(config=model.config), new_tokens)


@pytest.fixture
def session():
    with kvmem.local(device="host", budget="256MiB") as s:
        yield s


# ---- the Cache ----


@pytest.mark.parametrize("attn", ["sdpa", "eager", "kvmem_paged"])
def test_greedy_tokens_equal_dynamic_cache(model: torch.nn.Module, attn: str, session: kvmem.Session):
    expected = reference(model, "sdpa" if attn == "kvmem_paged" else attn)
    with KvmemCache(session, model.config, max_tokens=4096, low_watermark=0, high_watermark=0) as cache:
        got = generate(model, attn, cache)
        assert torch.equal(got, expected)
        # 3 rows of 19 + 20 - 1 = 38 cached tokens: 3 blocks of 16 each.
        assert cache.get_seq_length() == WIDTH + NEW_TOKENS - 1
        assert cache.num_blocks == 9 and cache.kv.get_num_used_blocks() == 9
    kv = session.caches[0]
    assert kv.stats().used_blocks == 0 and kv.stats().pages_held == 0


def test_paged_attention_without_padding_uses_its_own_causal_rule(llama: torch.nn.Module, session: kvmem.Session):
    llama.set_attn_implementation("sdpa")
    prompt = torch.tensor([PROMPTS[2]])
    expected = llama.generate(prompt, generation_config=greedy(), **{CACHE_ARGUMENT: DynamicCache(config=llama.config)})
    llama.set_attn_implementation("kvmem_paged")
    with KvmemCache(session, llama.config, max_tokens=4096) as cache:
        got = llama.generate(prompt, generation_config=greedy(), **{CACHE_ARGUMENT: cache})
    assert torch.equal(got, expected)


def test_paged_attention_combines_runs_of_scattered_blocks(llama: torch.nn.Module, session: kvmem.Session):
    expected = reference(llama)
    with KvmemCache(session, llama.config, block_size=4, max_tokens=4096) as cache:
        holes = cache.kv.alloc(12)
        cache.kv.free(holes[1::2])  # the next blocks handed out are 1, 3, 5, ...: no two consecutive
        got = generate(llama, "kvmem_paged", cache)
        assert torch.equal(got, expected)
        assert cache.table.runs[0][:3] == [(1, 1), (3, 1), (5, 1)]
        cache.kv.free(holes[0::2])


def test_paged_update_hands_over_views_and_the_kvmem_tensors(llama: torch.nn.Module, session: kvmem.Session):
    llama.set_attn_implementation("kvmem_paged")
    with KvmemCache(session, llama.config, max_tokens=4096) as cache:
        keys, values = torch.randn(2, 2, 5, HEAD_DIM), torch.randn(2, 2, 5, HEAD_DIM)
        got_k, got_v = cache.update(keys, values, 1)
        assert got_k.data_ptr() == keys.data_ptr() and got_v.data_ptr() == values.data_ptr()  # no copy
        paged = got_k.kvmem_paged
        assert paged is got_v.kvmem_paged
        assert paged.keys is cache.kv.k[1] and paged.values is cache.kv.v[1]
        assert paged.length == 5 and paged.block_size == 16
        assert [len(runs) for runs in paged.runs] == [1, 1]
        for row, runs in enumerate(paged.runs):
            block = runs[0][0]
            assert torch.equal(cache.kv.k[1][block, :5], keys[row].transpose(0, 1))
            assert torch.equal(cache.kv.v[1][block, :5], values[row].transpose(0, 1))


def test_paged_attention_without_a_kvmem_cache_is_sdpa(llama: torch.nn.Module):
    ids, mask = padded_batch()
    llama.set_attn_implementation("sdpa")
    expected = llama(ids, attention_mask=mask, use_cache=False).logits
    llama.set_attn_implementation("kvmem_paged")
    assert torch.equal(llama(ids, attention_mask=mask, use_cache=False).logits, expected)


def test_reset_returns_blocks_and_pages_and_the_cache_serves_again(llama: torch.nn.Module, session: kvmem.Session):
    expected = reference(llama)
    with KvmemCache(session, llama.config, max_tokens=4096, low_watermark=0, high_watermark=0) as cache:
        assert torch.equal(generate(llama, "sdpa", cache), expected)
        assert cache.kv.stats().pages_held > 0
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.num_blocks == 0
        assert cache.kv.get_num_used_blocks() == 0
        wait_for(lambda: cache.kv.stats().pages_held == 0, what="the empty slots to go back")
        assert torch.equal(generate(llama, "kvmem_paged", cache), expected)


def test_blocks_go_back_when_the_cache_object_is_collected(llama: torch.nn.Module, session: kvmem.Session):
    kv = session.kv_cache(2, 16, 2, HEAD_DIM, torch.float32, 4096, layout="NHD", low_watermark=0, high_watermark=0)
    cache = KvmemCache(kv, llama.config)
    generate(llama, "sdpa", cache)
    assert kv.get_num_used_blocks() == 9
    del cache
    gc.collect()
    assert kv.get_num_used_blocks() == 0
    wait_for(lambda: kv.stats().pages_held == 0, what="the empty slots to go back")
    assert len(kv.alloc(1)) == 1  # a cache passed in is left open


def test_a_kvmem_cache_that_does_not_fit_the_model_is_refused(llama: torch.nn.Module, session: kvmem.Session):
    kv = session.kv_cache(2, 16, 2, 32, torch.float32, 4096, layout="NHD")
    with pytest.raises(
        ValueError, match=r"\(2, 2, 32, 'NHD'\), dtype torch.float32 does not fit the model: \(2, 2, 16"
    ):
        KvmemCache(kv, llama.config)


def test_out_of_memory_raises_cleanly_and_the_cache_stays_usable(llama: torch.nn.Module):
    # 4 KiB pages: a growth maps one page in each of the 4 ranges (2 layers x K, V) = 2 blocks of 16 tokens
    # (16 tokens x 2 heads x 16 dims x 4 bytes = 2 KiB a block). A budget of 16 pages is 8 blocks in all.
    expected = reference(llama)
    source = LocalPageSource(HostDevice(granularity=4096), budget_pages=16)
    with (
        kvmem.Session(source) as s,
        KvmemCache(s, llama.config, max_tokens=4096, low_watermark=0, high_watermark=0) as cache,
    ):
        with pytest.raises(KvmemCacheFull, match=r"growing 3 sequence\(s\) to 33 tokens.*reset\(\) the cache") as info:
            generate(llama, "kvmem_paged", cache)
        assert isinstance(info.value, KVCacheFull) and info.value.reason == "budget"
        # The step that needed a third block per row wrote nothing: every layer stopped at 32 tokens.
        assert [layer.get_seq_length() for layer in cache.layers] == [32, 32]
        assert cache.num_blocks == 6 and cache.kv.get_num_used_blocks() == 6
        cache.reset()
        assert cache.kv.get_num_used_blocks() == 0
        got = generate(llama, "kvmem_paged", cache, new_tokens=10)  # 29 tokens: 2 blocks per row fit
        assert torch.equal(got, expected[:, : WIDTH + 10])


@pytest.mark.parametrize("attn", ["sdpa", "kvmem_paged"])
def test_a_borrowed_prefix_is_not_recomputed_and_gives_the_same_tokens(
    llama: torch.nn.Module, attn: str, session: kvmem.Session
):
    llama.set_attn_implementation(attn)
    prompt = torch.tensor([[*range(3, 35), 40, 41, 42]])  # a 32-token prefix (two blocks) and 3 more
    kv = session.kv_cache(2, 16, 2, HEAD_DIM, torch.float32, max_tokens=4096)
    with KvmemCache(kv, llama.config) as first:
        expected = llama.generate(prompt, generation_config=greedy(), **{CACHE_ARGUMENT: first})
        prefix = first.take_prefix(32)
    assert kv.get_num_used_blocks() == 2  # the rest went back; the prefix is the caller's now
    computed = []
    hook = llama.register_forward_pre_hook(
        lambda _m, _a, kw: computed.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with KvmemCache(kv, llama.config) as second:
            second.borrow_prefix(prefix, 32)
            got = llama.generate(prompt, generation_config=greedy(), **{CACHE_ARGUMENT: second})
            assert second.table.rows[0][:2] == prefix
    finally:
        hook.remove()
    assert torch.equal(got, expected)
    assert computed[0] == 3  # only the tokens after the prefix
    assert kv.get_num_used_blocks() == 2  # closing the borrower left the prefix alone
    kv.free(prefix)


def test_prefix_sharing_refuses_partial_blocks_and_foreign_blocks(llama: torch.nn.Module, session: kvmem.Session):
    kv = session.kv_cache(2, 16, 2, HEAD_DIM, torch.float32, max_tokens=4096)
    with KvmemCache(kv, llama.config) as cache:
        with pytest.raises(ValueError, match="whole blocks"):
            cache.borrow_prefix([0], 10)
        with pytest.raises(ValueError, match="whole number"):
            cache.take_prefix(16)  # nothing cached yet
        cache.borrow_prefix(kv.alloc(1), 16)
        with pytest.raises(ValueError, match="borrowed"):
            cache.take_prefix(16)


# ---- with the daemon ----


def test_the_daemon_sees_the_cache_while_it_holds_sequences(llama: torch.nn.Module, tmp_path: Path):
    expected = reference(llama)
    with DaemonProcess(tmp_path / "rt", "host", "64MiB", "--reserve", "0", "8") as daemon:
        with (
            kvmem.connect("hf-llama", runtime_dir=daemon.runtime_dir) as s,
            ControlClient(runtime_dir=daemon.runtime_dir) as control,
            KvmemCache(s, llama.config, max_tokens=4096, low_watermark=0, high_watermark=0) as cache,
        ):
            assert torch.equal(generate(llama, "kvmem_paged", cache), expected)
            # One growth unit: a 2 MiB page in each of the 4 ranges.
            daemon.wait_for_model("hf-llama", lambda m: m.used_pages == 4, what="usage reported")
            assert daemon.status().model("hf-llama").mapped_pages == 4
            (entry,) = [m for m in control.status()["models"] if m["model"] == "hf-llama"]
            assert entry["mapped_pages"] == 4
            cache.reset()
            daemon.wait_for_model("hf-llama", lambda m: m.used_pages == 0, what="usage reported")
            daemon.wait_for_model("hf-llama", lambda m: m.mapped_pages == 0, what="pages returned")
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="every page back in the pool")


# ---- continuous batching ----

BATCHING = {"page_size": 16, "num_blocks": 64, "max_batch_tokens": 64, "max_requests_per_batch": 4}


def generate_batch(model: torch.nn.Module) -> list[list[int]]:
    model.set_attn_implementation("sdpa")
    results = model.generate_batch(
        PROMPTS, generation_config=greedy(), continuous_batching_config=ContinuousBatchingConfig(**BATCHING)
    )
    assert [r.error for r in results.values()] == [None] * len(PROMPTS)
    return [r.generated_tokens for r in results.values()]


def test_generate_batch_on_kvmem_gives_the_tokens_of_transformers_own(model: torch.nn.Module, session):
    expected = generate_batch(model)
    assert expected == reference(model)[:, WIDTH:].tolist()
    kv = session.kv_cache(2, 16, 2, HEAD_DIM, torch.float32, 1024, layout="NHD", low_watermark=0, high_watermark=0)
    with kvmem_continuous_batching(model, kv) as scoped:
        assert scoped is kv
        assert generate_batch(model) == expected
        assert kv.stats().grows == 1  # the storage came from kvmem (1024 tokens: one slot)
    assert kv.get_num_used_blocks() == 0
    assert generate_batch(model) == expected  # transformers' own storage again: kvmem untouched
    assert kv.stats().grows == 1 and kv.get_num_used_blocks() == 0


def test_forked_requests_copy_their_partial_blocks_in_kvmem(llama: torch.nn.Module, session):
    # Two sequences per prompt: transformers forks each request after its prefill, sharing the full
    # blocks and copying the partial one. top_k=1 sampling is greedy, so both children must repeat
    # the greedy tokens, which they can only do if the copied block holds the parent's keys and values.
    forks = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, num_return_sequences=2, eos_token_id=None, pad_token_id=0
    )
    llama.set_attn_implementation("sdpa")
    config = ContinuousBatchingConfig(**{**BATCHING, "max_requests_per_batch": 8})
    with kvmem_continuous_batching(llama, session, max_tokens=1024, block_size=16):
        results = llama.generate_batch(PROMPTS, generation_config=forks, continuous_batching_config=config)
    expected = reference(llama)[:, WIDTH:].tolist()
    assert [r.generated_tokens for r in results.values()] == [row for row in expected for _ in range(2)]


def test_a_manager_kept_past_the_scope_fails_its_requests_clearly(llama: torch.nn.Module, session):
    config = ContinuousBatchingConfig(**BATCHING)
    with kvmem_continuous_batching(llama, session, max_tokens=1024, block_size=16):
        llama.set_attn_implementation("sdpa")
        llama.generate_batch(
            PROMPTS, generation_config=greedy(), continuous_batching_config=config, persistent_manager=True
        )
    try:
        results = llama.generate_batch(PROMPTS, generation_config=greedy(), continuous_batching_config=config)
        assert {str(r.error) for r in results.values()} == {
            "kvmem storage released: a continuous batching manager outlived its kvmem scope"
        }
    finally:
        llama.destroy_cached_continuous_batching_manager()


def test_a_page_size_other_than_the_block_size_is_refused(llama: torch.nn.Module, session):
    config = ContinuousBatchingConfig(**{**BATCHING, "page_size": 32})
    fits = r"\(2, 16, 2, 16, torch.float32, 'NHD', 'cpu'\) does not fit .* \(2, 32,"
    with (
        kvmem_continuous_batching(llama, session, max_tokens=1024, block_size=16),
        pytest.raises(ValueError, match=fits),
    ):
        llama.generate_batch(PROMPTS, generation_config=greedy(), continuous_batching_config=config)


def test_generate_batch_storage_is_visible_to_the_daemon_and_returned(llama: torch.nn.Module, tmp_path: Path):
    expected = generate_batch(llama)
    with (
        DaemonProcess(tmp_path / "rt", "host", "64MiB", "--reserve", "0", "8") as daemon,
        kvmem.connect("hf-batching", runtime_dir=daemon.runtime_dir) as s,
    ):
        scope = kvmem_continuous_batching(llama, s, max_tokens=1024, block_size=16, low_watermark=0, high_watermark=0)
        config = ContinuousBatchingConfig(**BATCHING)
        with (
            scope as kv,
            llama.continuous_batching_context_manager(
                generation_config=greedy(), continuous_batching_config=config, warmup=False
            ) as manager,
        ):
            ids = manager.add_requests(inputs=PROMPTS, max_new_tokens=NEW_TOKENS)
            results = {}
            while len(results) < len(ids):
                result = manager.get_result(timeout=10)
                assert result is not None, "continuous batching stopped answering"
                if result.is_finished():
                    results[result.request_id] = result.generated_tokens
            assert [results[i] for i in ids] == expected
            assert isinstance(manager.batch_processor.cache, KvmemPagedAttentionCache)
            # The padding trash and the finished requests' full blocks (kept for prefix sharing) are live.
            assert kv.get_num_used_blocks() >= 1
            daemon.wait_for_model("hf-batching", lambda m: m.used_pages == 4, what="usage reported")
        daemon.wait_for_model("hf-batching", lambda m: m.mapped_pages == 0, what="pages returned")


# ---- the supported range ----


def test_the_installed_transformers_is_in_the_supported_range():
    import transformers

    assert check_transformers_version() == transformers.__version__
    assert (
        SUPPORTED
        == f">={transformers_version.RELEASES.minimum},<{transformers_version.RELEASES.maximum}"
        == ">=5.23.0,<5.25"
    )


def test_generate_takes_the_cache_by_the_installed_releases_keyword():
    """5.24 renamed generate's ``past_key_values`` to ``cache`` (the old name warns); 5.23 knows only the old one."""
    from kvmem.integrations.transformers.version import cache_argument

    assert [cache_argument(v) for v in ("5.23.0", "5.24.0", "5.24.1", "5.25.0")] == [
        "past_key_values", "cache", "cache", "cache",
    ]  # fmt: skip
    import transformers

    assert cache_argument(transformers.__version__) == CACHE_ARGUMENT


@pytest.mark.parametrize("version", ["5.22.2", "5.25.0", "6.0.0", "4.57.6"])
def test_a_version_outside_the_range_fails_loudly_naming_it(version: str):
    with pytest.raises(
        UnsupportedTransformersError, match=rf"supports transformers {SUPPORTED} .*{version} is installed"
    ):
        check_transformers_version(version)


@pytest.mark.parametrize("module", ["kvmem.integrations.transformers", "kvmem.integrations.transformers.batching"])
def test_importing_the_integration_on_an_unsupported_release_fails_naming_the_range(module: str):
    code = f"import transformers; transformers.__version__ = '5.19.0'; import {module}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "kvmem.integrations.transformers.version.UnsupportedTransformersError: "
        "kvmem's transformers integration supports "
        f"transformers {SUPPORTED} (it relies on internals checked against that range); transformers 5.19.0 is "
        f"installed. Install a supported release: pip install 'transformers{SUPPORTED}'"
    )
