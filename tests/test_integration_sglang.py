"""kvmem.integrations.sglang with SGLang's real KV pool and paged allocator classes on device="cpu".

Needs SGLang, which the main suite's venv does not have: `make test-sglang` builds .venv-sglang
(SGLang 0.5.23 with --no-deps and the light dependencies its pools import) and runs this file.
SGLang's engine does not start on this machine (no CPU sgl_kernel on PyPI), so the tests drive
the pool and the allocator the way SGLang's scheduler and attention layers do: alloc/alloc_extend/
alloc_decode/free on the allocator, set_kv_buffer/get_key_buffer on the pool, with real kvmem pages
(a local session, or a real kvmemd process), comparing against SGLang's own in-tree pool and
allocator where the two must agree. The platform hook is exercised in fresh interpreters, because
SGLang resolves its platform once per process.

Geometry: pages of 32 tokens, 4 KV heads of dim 128, float32, 2 layers: one SGLang page is a
64 KiB kvmem block, a 2 MiB kvmem page holds 32 of them, and a page slot (the growth unit) maps one
page in each of the 4 ranges (K and V of 2 layers): 8 MiB per 32 SGLang pages. Page 0 is SGLang's
padding page, held by the pool, so slot 0 is always mapped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "sglang", reason="sglang is not installed: `make test-sglang` installs SGLang in .venv-sglang and runs these tests"
)

import torch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

import kvmem
from kvmem.integrations import sglang as kvmem_sglang
from kvmem.integrations.sglang.allocator import KvmemPagedTokenToKVPoolAllocator
from kvmem.integrations.sglang.pool import KvmemMHATokenToKVPool
from tests.daemon_support import DaemonProcess, wait_for
from tests.support import real_driver_env

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PAGE = 32  # tokens per SGLang page = one kvmem block
HEADS, DIM, LAYERS = 4, 128, 2
PAGES_PER_SLOT = 32  # SGLang pages per kvmem page slot (float32)
KVMEM_PAGES_PER_SLOT = 2 * LAYERS  # kvmem pages mapped per slot (K and V of each layer)
SIZE = 8 * PAGES_PER_SLOT * PAGE  # SGLang's token capacity: 256 pages
# Lots of free blocks may be mapped (no watermark), empty slots go back at once (high watermark 0).
ELASTIC = {"low_watermark": 0, "high_watermark": 0}


class Layer:
    """The one attribute of SGLang's RadixAttention that set_kv_buffer reads."""

    def __init__(self, layer_id: int):
        self.layer_id = layer_id


def pool_args(dtype: torch.dtype = torch.float32, **overrides) -> dict:
    """The keyword arguments SGLang's configurator passes to an MHA pool (kv_cache_configurator.py)."""
    args = dict(
        size=SIZE,
        page_size=PAGE,
        dtype=dtype,
        head_num=HEADS,
        head_dim=DIM,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
        v_head_dim=DIM,
        start_layer=0,
        end_layer=LAYERS - 1,
        enable_alt_stream=True,
        enable_kv_cache_copy=False,
    )
    args.update(overrides)
    return args


def make_pool(session, dtype=torch.float32, cache_options=ELASTIC, **overrides) -> KvmemMHATokenToKVPool:
    return KvmemMHATokenToKVPool(**pool_args(dtype, **overrides), session=session, cache_options=cache_options)


def make_allocator(pool, size: int = SIZE, cls=KvmemPagedTokenToKVPoolAllocator, need_sort: bool = False):
    # As the configurator builds it: (size, page_size, dtype, device, kvcache, need_sort).
    return cls(size, PAGE, pool.dtype, "cpu", pool, need_sort)


def pages_of(indices: torch.Tensor) -> list[int]:
    return sorted(set((indices // PAGE).tolist()))


def held(pool) -> int:
    return pool.kv.stats().pages_held


@pytest.fixture
def session():
    with kvmem.local(device="host", budget="96MiB") as s:  # 12 slots: more than SGLang's 256 pages
        yield s


@pytest.fixture
def daemon(tmp_path: Path):
    with DaemonProcess(tmp_path / "rt", "host", "24MiB", "--reserve", "0", "0") as d:  # 12 pages = 3 slots
        yield d


# ---- the version check and the platform hook ----


def test_versions_outside_the_range_are_refused_by_name():
    assert kvmem_sglang.SUPPORTED == ">=0.5.23,<0.5.24"
    from importlib.metadata import version

    assert kvmem_sglang.check_sglang_version() == version("sglang") == "0.5.23"
    assert kvmem_sglang.check_sglang_version("0.5.23.post1") == "0.5.23.post1"
    for bad in ("0.5.22", "0.5.24", "0.6.0"):
        with pytest.raises(kvmem_sglang.UnsupportedSglangError, match=r">=0\.5\.23,<0\.5\.24.*sglang " + bad):
            kvmem_sglang.check_sglang_version(bad)


def run_sglang(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (SGLang picks its platform once per process), without the fake driver."""
    base = {k: v for k, v in real_driver_env().items() if not k.startswith(("KVMEM", "SGLANG_"))}
    base.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


HOOK_PROBE = """
import json
from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.platforms import current_platform
# SGLang's own resolution of the pool class (the configurator method, which reads only the platform).
pool_cls = KVCacheConfigurator._resolve_kv_pool_class(None, kind="mha", default=MHATokenToKVPool)
allocator_cls = current_platform.get_paged_allocator_cls()
try:
    current_platform.get_kv_pool_cls(kind="mla")
    mla = "accepted"
except Exception as exc:
    mla = f"{type(exc).__name__}: {exc}"
print(json.dumps({
    "platform": type(current_platform).__name__,
    "bases": [c.__name__ for c in type(current_platform).__mro__[1:3]],
    "pool": f"{pool_cls.__module__}.{pool_cls.__name__}",
    "allocator": None if allocator_cls is None else f"{allocator_cls.__module__}.{allocator_cls.__name__}",
    "mla": mla,
}))
"""


def test_kvmem_1_switches_the_platform_hooks_to_kvmem_and_nothing_changes_without_it():
    on = run_sglang(HOOK_PROBE, KVMEM="1")
    assert on.returncode == 0, on.stderr[-3000:]
    out = json.loads(on.stdout.strip().splitlines()[-1])
    assert out["platform"] == "KvmemPlatform"
    assert out["bases"] == ["_KvmemHooks", "SRTPlatform"]  # SGLang's own platform for this machine, hooked
    assert out["pool"] == "kvmem.integrations.sglang.pool.KvmemMHATokenToKVPool"
    assert out["allocator"] == "kvmem.integrations.sglang.allocator.KvmemPagedTokenToKVPoolAllocator"
    assert out["mla"].startswith("UnsupportedSglangError: kvmem's SGLang integration holds MHA KV pools only")

    off = run_sglang(HOOK_PROBE)
    assert off.returncode == 0, off.stderr[-3000:]
    out = json.loads(off.stdout.strip().splitlines()[-1])
    assert (out["platform"], out["allocator"], out["mla"]) == ("SRTPlatform", None, "accepted")
    assert out["pool"] == "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool"

    chosen = run_sglang(HOOK_PROBE, KVMEM="1", SGLANG_PLATFORM="kvmem")  # selected by name among plugins
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    assert json.loads(chosen.stdout.strip().splitlines()[-1])["platform"] == "KvmemPlatform"
    named_off = run_sglang(HOOK_PROBE, SGLANG_PLATFORM="kvmem")
    assert named_off.returncode != 0
    assert "Platform plugin 'kvmem' is installed but activate() returned None" in named_off.stderr


def test_an_unsupported_sglang_fails_loudly_when_the_platform_is_resolved():
    probe = """
import importlib.metadata as md
real = md.version
md.version = lambda name: "0.5.22" if name == "sglang" else real(name)
from sglang.srt.platforms import current_platform
print(type(current_platform).__name__)
"""
    result = run_sglang(probe, KVMEM="1")  # SGLANG_PLATFORM unset: SGLang only logs an entry point's errors
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "kvmem.integrations.sglang.version.UnsupportedSglangError: kvmem's SGLang integration supports sglang "
        ">=0.5.23,<0.5.24 (it subclasses KV pool and allocator internals checked against that range); sglang "
        "0.5.22 is installed. Install a supported release (pip install sglang==0.5.23), or unset KVMEM to run "
        "SGLang without kvmem"
    )


SWA_PROBE = """
import json
import torch
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
from sglang.srt.platforms import current_platform

PAGE, HEADS, DIM = 32, 4, 128
pool = SWAKVPool(
    size=64 * PAGE, size_swa=32 * PAGE, page_size=PAGE, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
    swa_attention_layer_ids=[0, 2], full_attention_layer_ids=[1], device="cpu",
    token_to_kv_pool_class=current_platform.get_kv_pool_cls(kind="mha"), enable_memory_saver=False,
)
allocator = SWATokenToKVPoolAllocator(
    64 * PAGE, 32 * PAGE, page_size=PAGE, dtype=torch.float32, device="cpu", kvcache=pool, need_sort=False
)
subs = [type(a).__name__ for a in (allocator.full_attn_allocator, allocator.swa_attn_allocator)]
held = lambda: [p.kv.stats().pages_held for p in (pool.full_kv_pool, pool.swa_kv_pool)]
before = held()
prefix = torch.tensor([0, 0]); seq = torch.tensor([40, 50]); last = torch.tensor([-1, -1])
out = allocator.alloc_extend(prefix, prefix, seq, seq, last, 90)
swa = allocator.translate_loc_from_full_to_swa(out)
class L:
    def __init__(self, i): self.layer_id = i
ok = []
for layer in range(3):
    k = torch.randn(90, HEADS, DIM); v = torch.randn(90, HEADS, DIM)
    pool.set_kv_buffer(L(layer), KVWriteLoc(out, swa_loc=swa), k, v)
    sub = pool.swa_kv_pool if layer != 1 else pool.full_kv_pool
    idx = swa if layer != 1 else out
    local = pool.layers_mapping[layer][0]
    ok.append(bool(torch.equal(sub.k_buffer[local][idx], k) and torch.equal(pool.get_value_buffer(layer)[idx], v)))
held_pages = [a.held_pages() for a in (allocator.full_attn_allocator, allocator.swa_attn_allocator)]
allocator.free(out)
after = [a.held_pages() for a in (allocator.full_attn_allocator, allocator.swa_attn_allocator)]
labels = [p.allocation_label for p in (pool.full_kv_pool, pool.swa_kv_pool)]
print(json.dumps({"subs": subs, "labels": labels, "before": before, "ok": ok, "held": held_pages, "after": after}))
"""


def test_sglangs_swa_composite_builds_both_sub_pools_and_allocators_on_kvmem():
    """SWAKVPool and SWATokenToKVPoolAllocator, SGLang's own code, take kvmem's classes from the hooks."""
    result = run_sglang(SWA_PROBE, KVMEM="1", KVMEM_DEVICE="host", KVMEM_BUDGET="32MiB")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["subs"] == ["KvmemPagedTokenToKVPoolAllocator"] * 2
    assert out["labels"] == ["Full", "SWA"]  # one kvmem session (one local budget) each
    assert out["before"] == [2, 4]  # the padding slot: K and V of 1 full layer, of 2 SWA layers
    assert out["ok"] == [True, True, True]  # each layer's K/V read back bit-exact from its sub-pool
    assert out["held"] == [4, 4] and out["after"] == [0, 0]  # 40 + 50 tokens: 2 + 2 pages on each side


# ---- the pool: SGLang's layout, on kvmem pages ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_buffers_have_sglangs_layout_on_the_kvmem_reservation(session, dtype: torch.dtype):
    reference = MHATokenToKVPool(**pool_args(dtype))
    pool = make_pool(session, dtype)
    try:
        for mine, theirs in ((pool.k_buffer, reference.k_buffer), (pool.v_buffer, reference.v_buffer)):
            assert len(mine) == len(theirs) == LAYERS
            for a, b in zip(mine, theirs, strict=True):
                assert (a.dtype, a.stride(), a.shape[1:]) == (b.dtype, b.stride(), b.shape[1:])
                assert a.shape[0] >= b.shape[0] and a.is_contiguous()
        for layer in range(LAYERS):
            # Each buffer is kvmem's own range for that layer (block p = SGLang page p).
            assert pool.k_buffer[layer].data_ptr() == pool.kv.range_address(layer, "k")
            assert pool.v_buffer[layer].data_ptr() == pool.kv.range_address(layer, "v")
            # As in-tree, V lies a whole number of pages after K.
            page_bytes = PAGE * HEADS * DIM * pool.store_dtype.itemsize
            assert (pool.v_buffer[layer].data_ptr() - pool.k_buffer[layer].data_ptr()) % page_bytes == 0
        # The pool's size is kvmem's capacity (whole slots), and the buffers hold exactly size + page_size rows.
        assert pool.size == pool.kv.max_blocks * PAGE - PAGE >= SIZE
        assert pool.k_buffer[0].shape[0] == pool.size + PAGE
        assert pool.get_kv_buffer(0)[0].dtype == dtype
        assert held(pool) == KVMEM_PAGES_PER_SLOT  # only the padding page's slot is mapped
        assert pool.kv.get_num_used_blocks() == 1
    finally:
        pool.close()
    assert not session.source.held_pages  # every page is back with the local source (and closed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_set_get_kv_round_trips_are_bit_exact_and_equal_sglangs_own(session, dtype: torch.dtype):
    reference = MHATokenToKVPool(**pool_args(dtype))
    ref_alloc = make_allocator(reference, cls=PagedTokenToKVPoolAllocator)
    pool = make_pool(session, dtype)
    allocator = make_allocator(pool)
    gen = torch.Generator().manual_seed(0)
    try:
        locs = allocator.alloc(5 * PAGE)
        assert torch.equal(locs, ref_alloc.alloc(5 * PAGE))  # fresh allocators hand out the same slots
        locs = locs[torch.randperm(len(locs), generator=gen)][:100]  # any order, any subset
        for layer in range(LAYERS):
            k = torch.randn(len(locs), HEADS, DIM, generator=gen).to(dtype)
            v = torch.randn(len(locs), HEADS, DIM, generator=gen).to(dtype)
            for p in (pool, reference):
                p.set_kv_buffer(Layer(layer), locs, k, v)
            for got in (pool.get_key_buffer(layer)[locs], pool.get_value_buffer(layer)[locs]):
                assert got.dtype == dtype
            # Bit-exact: compare the stored bytes.
            assert torch.equal(pool.k_buffer[layer][locs], k.view(pool.store_dtype))
            assert torch.equal(pool.v_buffer[layer][locs], v.view(pool.store_dtype))
            # The whole mapped slot equals SGLang's own buffer (the rest of the rows is not mapped).
            rows = pool.kv.blocks_per_slot * PAGE
            assert torch.equal(pool.k_buffer[layer][:rows], reference.k_buffer[layer][:rows])
            assert torch.equal(pool.v_buffer[layer][:rows], reference.v_buffer[layer][:rows])
            # And they are in kvmem's blocks: token t of page p is row t of kvmem block p.
            flat = pool.kv.k[layer].view(pool.store_dtype).reshape(-1, HEADS, DIM)
            assert torch.equal(flat[locs], k.view(pool.store_dtype))
    finally:
        pool.close()


def test_hnd_layout_round_trips_through_sglangs_page_scatter(session, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    reference = MHATokenToKVPool(**pool_args(torch.float16))
    pool = make_pool(session, torch.float16)
    allocator = make_allocator(pool)
    try:
        assert pool.kv.layout == "HND" and pool.use_hnd
        assert pool.k_buffer[0].shape == (pool.kv.max_blocks, HEADS, PAGE, DIM)
        assert pool.k_buffer[0].stride() == reference.k_buffer[0].stride()
        locs = allocator.alloc(3 * PAGE)[7:90]
        k = torch.randn(len(locs), HEADS, DIM).half()
        v = torch.randn(len(locs), HEADS, DIM).half()
        pool.set_kv_buffer(Layer(1), locs, k, v)
        pages, offs = locs // PAGE, locs % PAGE
        assert torch.equal(pool.get_key_buffer(1)[pages, :, offs, :], k)
        assert torch.equal(pool.get_value_buffer(1)[pages, :, offs, :], v)
        assert torch.equal(pool.kv.k[1][pages, :, offs, :], k)  # kvmem's HND block p is SGLang's page p
    finally:
        pool.close()


def test_unsupported_configurations_are_refused_with_one_clear_error(session):
    Unsupported = kvmem_sglang.UnsupportedSglangError
    with pytest.raises(Unsupported, match="needs --page-size 2 or more"):
        make_pool(session, page_size=1)
    with pytest.raises(Unsupported, match=r"needs v_head_dim == head_dim \(got 64 and 128\)"):
        make_pool(session, v_head_dim=64)
    with pytest.raises(Unsupported, match=r"not torch\.float8_e5m2fnuz"):
        make_pool(session, torch.float8_e5m2fnuz)
    with pytest.raises(Unsupported, match="holds the 'nhd' and 'hnd' layouts, not 'page_major'"):
        make_pool(session, kv_cache_layout="page_major")
    assert not session.caches and not session.source.held_pages  # nothing was made or mapped
    in_tree = MHATokenToKVPool(**pool_args())
    with pytest.raises(Unsupported, match="allocates from a KvmemMHATokenToKVPool, not a MHATokenToKVPool"):
        make_allocator(in_tree)


def test_the_pool_refuses_writes_until_the_kvmem_allocator_claims_it(session):
    pool = make_pool(session)
    try:
        k = torch.zeros(1, HEADS, DIM)
        with pytest.raises(RuntimeError, match="written before KvmemPagedTokenToKVPoolAllocator claimed it"):
            pool.set_kv_buffer(Layer(0), torch.tensor([PAGE]), k, k)
        make_allocator(pool)
        pool.set_kv_buffer(Layer(0), torch.tensor([PAGE]), k + 1, k + 2)
        with pytest.raises(RuntimeError, match="already has an allocator"):
            make_allocator(pool)
    finally:
        pool.close()


# ---- the allocator: SGLang's API, pages from kvmem ----


def test_alloc_extend_and_decode_give_sglangs_own_slots_on_a_fresh_pool(session):
    pool = make_pool(session)
    allocator = make_allocator(pool)
    reference = make_allocator(MHATokenToKVPool(**pool_args()), cls=PagedTokenToKVPoolAllocator)
    try:
        # Request B has a 40-token prefix on pages 1-2, request C a 32-token one filling page 3.
        first = {a: a.alloc(3 * PAGE) for a in (allocator, reference)}
        assert torch.equal(first[allocator], first[reference])
        # A batch: A new (64 tokens), B 40 -> 100, C 32 -> 33. Lengths on CPU, as SGLang keeps them.
        prefix = torch.tensor([0, 40, 32])
        seq = torch.tensor([64, 100, 33])
        last_loc = torch.tensor([-1, PAGE + 39, 3 * PAGE + 31])
        args = (prefix, prefix, seq, seq, last_loc, int((seq - prefix).sum()))
        out = allocator.alloc_extend(*args)
        assert torch.equal(out, reference.alloc_extend(*args))
        assert len(out) == 125 and len(set(out.tolist())) == 125
        assert torch.equal(out[64:88], torch.arange(PAGE + 40, 3 * PAGE))  # B first fills its page 2
        assert allocator.held_pages() == 3 + 2 + 2 + 1  # new pages: A 2, B 2, C 1
        # A decode step: A (65 tokens) starts a new page, B and C continue theirs.
        seq2 = seq + 1
        last2 = torch.stack([out[63], out[123], out[124]])
        dec = allocator.alloc_decode(seq2, seq2, last2)
        assert torch.equal(dec, reference.alloc_decode(seq2, seq2, last2))
        assert dec[0] % PAGE == 0 and torch.equal(dec[1:], last2[1:] + 1)
        assert allocator.held_pages() == 9
        assert allocator.available_size() == reference.available_size() == SIZE - 9 * PAGE
        assert held(pool) == KVMEM_PAGES_PER_SLOT  # 9 pages and the padding page: one kvmem slot
    finally:
        pool.close()


def test_pages_are_mapped_as_tokens_are_allocated_and_go_back_when_freed(session):
    pool = make_pool(session)
    allocator = make_allocator(pool)
    try:
        assert held(pool) == session.source.held_pages == KVMEM_PAGES_PER_SLOT  # the padding page's slot
        a = allocator.alloc((PAGES_PER_SLOT - 1) * PAGE)  # fills slot 0
        assert held(pool) == KVMEM_PAGES_PER_SLOT
        b = allocator.alloc(PAGE)  # one more page: kvmem maps slot 1
        assert pages_of(b) == [PAGES_PER_SLOT]
        assert held(pool) == 2 * KVMEM_PAGES_PER_SLOT == session.source.held_pages
        c = allocator.alloc(2 * PAGES_PER_SLOT * PAGE)  # two whole slots more
        assert held(pool) == 4 * KVMEM_PAGES_PER_SLOT
        assert allocator.held_pages() == 31 + 1 + 64
        allocator.free(c)
        # Slots 2 and 3 are empty: kvmem's background thread unmaps them and returns their pages.
        wait_for(lambda: session.source.held_pages == 2 * KVMEM_PAGES_PER_SLOT, what="two slots back")
        assert held(pool) == 2 * KVMEM_PAGES_PER_SLOT
        allocator.free(b)
        wait_for(lambda: held(pool) == KVMEM_PAGES_PER_SLOT, what="slot 1 back")
        # Slot 0 keeps the padding page: never given back while the pool lives.
        allocator.free(a)
        assert pool.kv.get_num_used_blocks() == 1 and allocator.held_pages() == 0
        assert held(pool) == KVMEM_PAGES_PER_SLOT
    finally:
        pool.close()
    assert not session.source.held_pages


@pytest.mark.parametrize("need_sort", [False, True])  # True: PD disaggregation, where SGLang stages frees
def test_free_groups_segments_and_clear_return_every_page(session, need_sort: bool):
    pool = make_pool(session)
    allocator = make_allocator(pool, need_sort=need_sort)
    try:
        x = allocator.alloc(3 * PAGE)
        y = allocator.alloc(2 * PAGE)
        allocator.free_group_begin()
        allocator.free(x[: PAGE + 5])  # x's pages 1 and 2 (any token of a page frees the page)
        allocator.free_segment(y, start_pos=0)  # y's pages 4 and 5
        assert allocator.held_pages() == 5  # deferred until the group ends
        allocator.free_group_end()
        assert allocator.held_pages() == 1  # x's page 3
        assert pool.kv.get_num_used_blocks() == 2  # and the padding page
        allocator.alloc(PAGES_PER_SLOT * PAGE)  # slot 0's 30 free pages and 2 of slot 1
        assert held(pool) == 2 * KVMEM_PAGES_PER_SLOT
        allocator.clear()  # SGLang's flush: every page back
        assert allocator.held_pages() == 0 and allocator.available_size() == SIZE
        assert pool.kv.get_num_used_blocks() == 1
        wait_for(lambda: held(pool) == KVMEM_PAGES_PER_SLOT, what="the second slot back after clear")
    finally:
        pool.close()


def test_double_frees_and_the_padding_page_are_refused(session):
    pool = make_pool(session)
    allocator = make_allocator(pool)
    try:
        x = allocator.alloc(2 * PAGE)
        allocator.free(x[PAGE:])
        with pytest.raises(ValueError, match="free of page 2: it is not allocated"):
            allocator.free(x)  # page 1 is still held, page 2 is not: nothing is freed
        assert allocator.held_pages() == 1
        with pytest.raises(ValueError, match="free of page 0: it is SGLang's padding page"):
            allocator.free_page_ids(torch.tensor([0]))
        allocator.free(x[:PAGE])
        assert allocator.held_pages() == 0 and pool.kv.get_num_used_blocks() == 1
    finally:
        pool.close()


def test_out_of_memory_is_none_from_every_alloc_and_nothing_is_taken():
    with kvmem.local(device="host", budget="16MiB") as session:  # 8 pages: 2 slots, 63 SGLang pages
        pool = make_pool(session)
        allocator = make_allocator(pool)
        try:
            assert allocator.available_size() == (2 * PAGES_PER_SLOT - 1) * PAGE  # exactly what kvmem can map
            full = allocator.alloc((2 * PAGES_PER_SLOT - 1) * PAGE)
            assert full is not None and allocator.available_size() == 0
            before = (pool.kv.stats(), allocator.held_pages(), len(allocator.free_pages))
            assert allocator.alloc(PAGE) is None
            one = torch.tensor([1])
            assert allocator.alloc_extend(torch.tensor([0]), torch.tensor([0]), one, one, torch.tensor([-1]), 1) is None
            last = full[PAGE - 1 : PAGE]  # a request whose 32 tokens fill its page: decode needs a new one
            seq = torch.tensor([PAGE + 1])
            assert allocator.alloc_decode(seq, seq, last) is None
            assert (pool.kv.stats().used_blocks, allocator.held_pages(), len(allocator.free_pages)) == (
                before[0].used_blocks,
                *before[1:],
            )
            allocator.free(full[: 2 * PAGE])
            assert allocator.available_size() == 2 * PAGE
            assert allocator.alloc_decode(seq, seq, last) is not None  # room again
        finally:
            pool.close()


def test_sglangs_token_cap_bounds_the_pages_taken(session):
    pool = make_pool(session)
    allocator = make_allocator(pool, size=10 * PAGE)  # SGLang sized the cache to 10 pages
    try:
        assert allocator.available_size() == 10 * PAGE
        assert allocator.alloc(10 * PAGE) is not None
        assert allocator.alloc(PAGE) is None and allocator.available_size() == 0
    finally:
        pool.close()


def test_a_pool_from_the_environment_opens_and_closes_its_own_session(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KVMEM_DEVICE", "host")
    monkeypatch.setenv("KVMEM_BUDGET", "16MiB")
    pool = KvmemMHATokenToKVPool(**pool_args())
    try:
        assert isinstance(pool.session.source, kvmem.session.LocalPageSource)
        assert pool.session.source.budget_pages == 8
        allocator = make_allocator(pool)
        assert allocator.available_size() == (2 * PAGES_PER_SLOT - 1) * PAGE
    finally:
        pool.close()
    assert pool.session is None  # it owned the session and closed it


# ---- with a real daemon ----


def published(daemon: DaemonProcess, model: str, field: str, value: int) -> None:
    """Wait until the daemon's status segment shows `value` for `model`'s `field` (it publishes on its own time)."""

    def shows() -> bool:
        status = daemon.status().model(model)
        return status is not None and getattr(status, field) == value

    wait_for(shows, what=f"{model}'s {field} to be {value} in the daemon's status")


def test_with_a_daemon_mapped_pages_rise_on_alloc_and_fall_when_freed(daemon: DaemonProcess, tmp_path: Path):
    def mapped(value: int) -> None:
        published(daemon, "sglang-test", "mapped_pages", value)

    with kvmem.connect("sglang-test", runtime_dir=tmp_path / "rt") as session:
        pool = make_pool(session)
        allocator = make_allocator(pool)
        try:
            mapped(KVMEM_PAGES_PER_SLOT)  # the padding page's slot
            # 3 slots' budget: 31 free blocks mapped, 2 slots of headroom from the status segment.
            # (The estimate reads the status segment, which the daemon publishes on its own time.)
            wait_for(lambda: allocator.available_size() == (3 * PAGES_PER_SLOT - 1) * PAGE, what="the estimate")
            a = allocator.alloc(PAGES_PER_SLOT * PAGE)  # slot 0's 31 free pages and one of slot 1
            mapped(2 * KVMEM_PAGES_PER_SLOT)
            k = torch.randn(len(a), HEADS, DIM)
            pool.set_kv_buffer(Layer(0), a, k, -k)
            assert torch.equal(pool.get_key_buffer(0)[a], k) and torch.equal(pool.get_value_buffer(0)[a], -k)
            b = allocator.alloc(2 * PAGES_PER_SLOT * PAGE - PAGE)  # up to the budget
            mapped(3 * KVMEM_PAGES_PER_SLOT)
            assert daemon.status().daemon.budget_pages == 3 * KVMEM_PAGES_PER_SLOT
            wait_for(lambda: allocator.available_size() == 0, what="no headroom left in the estimate")
            denies = daemon.status().model("sglang-test").denies
            assert allocator.alloc(PAGE) is None  # the daemon said no: None, as SGLang's own allocator says
            published(daemon, "sglang-test", "denies", denies + 1)
            allocator.free(b)
            mapped(2 * KVMEM_PAGES_PER_SLOT)  # the daemon's count falls
            assert daemon.status().daemon.pages_granted == 2 * KVMEM_PAGES_PER_SLOT
            assert torch.equal(pool.get_key_buffer(0)[a], k)  # live pages untouched
            allocator.free(a)
            mapped(KVMEM_PAGES_PER_SLOT)  # slot 1 back
        finally:
            pool.close()
        mapped(0)
    wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="every page back")


def test_with_a_daemon_an_idle_models_pages_count_as_headroom_and_are_taken(daemon: DaemonProcess, tmp_path: Path):
    runtime = tmp_path / "rt"
    with (
        kvmem.connect("idle", runtime_dir=runtime) as idle_session,
        kvmem.connect("sglang-test", runtime_dir=runtime) as session,
    ):
        # Another model maps 8 pages (4 slots of one 2 MiB block in its K and V) and frees its blocks;
        # a high watermark of 4 blocks keeps its empty slots until the daemon asks for them.
        idle = idle_session.kv_cache(
            num_layers=1, block_size=1, num_kv_heads=1, head_dim=2 * MiB, dtype="int8", max_tokens=8,
            low_watermark=0, high_watermark=4,
        )  # fmt: skip
        idle.free(idle.alloc(4))
        published(daemon, "idle", "mapped_pages", 8)
        published(daemon, "idle", "used_pages", 0)
        pool = make_pool(session)  # takes the last free slot of the 3-slot budget
        allocator = make_allocator(pool)
        try:
            # No free budget is left, but the daemon would ask the idle model's pages back.
            wait_for(lambda: daemon.status().daemon.pages_granted == 12, what="the whole budget granted")
            wait_for(lambda: allocator.available_size() == (3 * PAGES_PER_SLOT - 1) * PAGE, what="headroom")
            got = allocator.alloc(2 * PAGES_PER_SLOT * PAGE)
            assert got is not None  # the daemon reclaimed the idle model's pages for it
            published(daemon, "sglang-test", "mapped_pages", 3 * KVMEM_PAGES_PER_SLOT)
            assert idle.stats().mapped_slots == 0 and daemon.status().model("idle").reclaims >= 1
        finally:
            pool.close()


def test_a_pool_from_the_environment_connects_to_the_daemon_by_name(
    daemon: DaemonProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("KVMEM_MODEL", "llama-env")
    monkeypatch.setenv("KVMEM_RUNTIME_DIR", str(tmp_path / "rt"))
    first = KvmemMHATokenToKVPool(**pool_args())
    second = KvmemMHATokenToKVPool(**pool_args(), allocation_label="SWA")  # e.g. SWA's second pool
    try:
        published(daemon, "llama-env", "mapped_pages", KVMEM_PAGES_PER_SLOT)
        published(daemon, "llama-env-SWA", "mapped_pages", KVMEM_PAGES_PER_SLOT)
        assert sorted(m.model for m in daemon.status().models) == ["llama-env", "llama-env-SWA"]
    finally:
        first.close()
        second.close()
    published(daemon, "llama-env", "mapped_pages", 0)  # each pool closed the session it opened
    published(daemon, "llama-env-SWA", "mapped_pages", 0)
    wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="every page back")
    again = KvmemMHATokenToKVPool(**pool_args())  # the name is free again once its session closed
    try:
        published(daemon, "llama-env", "mapped_pages", KVMEM_PAGES_PER_SLOT)
    finally:
        again.close()
