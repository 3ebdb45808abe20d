"""The parts of kvmem's vLLM integration that need no vLLM: geometry, block-count rounding, refusals.

vLLM's own objects are stood in for by namespaces with the attributes the code reads (vllm 0.32:
`KVCacheConfig`, `KVCacheTensor`, `KVCacheLayout`, `KVCacheSpec`, the parallel config); the
integration with real vLLM engines is tests/test_integration_vllm.py (`make test-vllm`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import kvmem
from kvmem.integrations.vllm import UnsupportedVllmConfigError, allocation, budget
from kvmem.integrations.vllm.geometry import VllmKVGeometry, blocks_per_slot, geometry_of

MiB = 1 << 20
LBHNC = SimpleNamespace(name="LBHNC", is_layer_compact=True, is_block_compact=True)
BLHNC = SimpleNamespace(name="BLHNC", is_layer_compact=False, is_block_compact=True)
LHBNC = SimpleNamespace(name="LHBNC", is_layer_compact=True, is_block_compact=False)


def config(num_blocks: int, stride: int, *tensors: tuple[list[str], int], size: int | None = None, **overrides):
    """A KVCacheConfig of layer-outer tensors: each (layer names, first region)."""
    region = num_blocks * stride
    regions = max(first + len(layers) for layers, first in tensors)
    made = [
        SimpleNamespace(
            size=size if size is not None else regions * region,
            layers=layers,
            layer_stride=overrides.get("layer_stride", region),
            block_stride=stride,
            offset=first * region,
        )
        for layers, first in tensors
    ]
    return SimpleNamespace(num_blocks=num_blocks, kv_cache_tensors=made)


def views(*names: str) -> dict[str, bool]:
    return dict.fromkeys(names, True)


def test_each_layer_is_a_region_of_num_blocks_blocks():
    geometry = geometry_of(config(64, 128 << 10, (["l0", "l1"], 0)), LBHNC, views("l0", "l1"))
    assert geometry == VllmKVGeometry(num_blocks=64, block_stride=128 << 10, regions=2, size=16 * MiB)
    assert (geometry.region_bytes, geometry.kvmem_layers, geometry.blocks_per_slot(2 * MiB)) == (8 * MiB, 1, 16)


def test_cache_groups_alias_the_same_regions_and_an_odd_count_gets_a_spare_kvmem_range():
    # Two groups of 3 and 2 layers overlay each other from byte 0 (a block belongs to one group at a time).
    kv = config(32, 64 << 10, (["a0", "a1", "a2"], 0), (["b0", "b1"], 0))
    geometry = geometry_of(kv, LBHNC, views("a0", "a1", "a2", "b0", "b1"))
    assert (geometry.regions, geometry.kvmem_layers) == (3, 2)


@pytest.mark.parametrize(
    ("kv", "layout", "layer_views", "message"),
    [
        (config(8, 4096, (["l0"], 0)), BLHNC, views("l0"), "layer-outer KV cache layouts .* resolved BLHNC"),
        (config(8, 4096, (["l0"], 0)), LHBNC, views("l0"), "resolved LHBNC"),
        (config(8, 4096, (["l0"], 0)), LBHNC, {"l0": False}, "layer l0 has a raw state buffer"),
        (config(8, 4096, (["l0"], 0), layer_stride=4096), LBHNC, views("l0"), "layer_stride 4096 at offset 0"),
        (config(8, 4096, (["l0"], 0), size=40000), LBHNC, views("l0"), "40000 bytes, not the 1 regions of 32768"),
    ],
)
def test_layouts_kvmem_cannot_back_are_refused_by_name(kv, layout, layer_views: dict[str, bool], message: str):
    with pytest.raises(UnsupportedVllmConfigError, match=message):
        geometry_of(kv, layout, layer_views)


def test_two_block_strides_are_refused():
    kv = config(8, 4096, (["l0"], 0))
    kv.kv_cache_tensors.append(
        SimpleNamespace(size=32768, layers=["l1"], layer_stride=65536, block_stride=8192, offset=0)
    )
    with pytest.raises(UnsupportedVllmConfigError, match=r"one block stride .* \[4096, 8192\]"):
        geometry_of(kv, LBHNC, views("l0", "l1"))


def test_a_kvmem_cache_built_on_the_geometry_has_vllms_regions_as_its_ranges():
    geometry = VllmKVGeometry(num_blocks=64, block_stride=128 << 10, regions=3, size=3 * 8 * MiB)
    with kvmem.local(device="host", budget="64MiB") as s:
        try:
            cache = allocation._new_cache(s, geometry)
            assert allocation.current_cache() is cache
            assert (cache.num_ranges, cache.range_bytes, cache.max_blocks) == (4, geometry.region_bytes, 64)
            assert cache.num_ranges * cache.range_bytes >= geometry.size  # vLLM's buffer fits the reservation
            assert cache.stats().mapped_slots == 0  # nothing mapped until vLLM's blocks are used
            assert allocation.cache_for_pool(64) is cache
            with pytest.raises(UnsupportedVllmConfigError, match="64 blocks but its KV tensors 32"):
                allocation._geometry = VllmKVGeometry(32, 128 << 10, 3, 3 * 4 * MiB)
                allocation.cache_for_pool(64)
            with pytest.raises(UnsupportedVllmConfigError, match="60 KV blocks are not a whole number of page slots"):
                allocation._new_cache(s, VllmKVGeometry(60, 128 << 10, 2, 2 * 60 * (128 << 10)))
        finally:
            allocation.close()
    assert allocation.current_cache() is None


def test_a_scheduler_without_the_workers_kv_cache_in_its_process_is_refused():
    assert allocation.current_cache() is None
    with pytest.raises(
        UnsupportedVllmConfigError, match=r"no kvmem KV cache in its process and no multiprocess executor"
    ):
        allocation.cache_for_pool(64)


def spec(page_size_bytes: int, alignment: int = 1) -> SimpleNamespace:
    return SimpleNamespace(page_size_bytes=page_size_bytes, get_block_stride_alignment=lambda: alignment)


def test_the_block_count_is_rounded_down_to_whole_page_slots(monkeypatch: pytest.MonkeyPatch):
    assert blocks_per_slot(128 << 10, 2 * MiB) == 16
    assert blocks_per_slot(80 << 10, 2 * MiB) == 128  # 5 pages hold 128 blocks of 80 KiB
    # 100 KiB padded to 112 KiB: 7 pages hold 128 blocks; with 16 blocks of 128 KiB a slot, lcm(16, 128).
    specs = {"l0": spec(128 << 10), "l1": spec(100 << 10, alignment=16 << 10)}
    assert budget.slot_alignment(specs, 2 * MiB) == 128
    assert budget.slot_alignment({"l0": spec(96 << 10)}, 2 * MiB) == 64  # 3 pages hold 64 blocks
    stock = budget.whole_slots(lambda vllm_config, num_blocks: num_blocks)
    monkeypatch.setattr(budget, "_alignment", 16)
    assert [stock(None, n) for n in (256, 255, 16)] == [256, 240, 16]
    with pytest.raises(UnsupportedVllmConfigError, match="15 blocks is less than one page slot of 16 blocks"):
        stock(None, 15)
    monkeypatch.setattr(budget, "_alignment", 1)  # kvmem has not sized this engine: vLLM's count stands
    assert stock(None, 255) == 255


def parallel_config(**settings) -> SimpleNamespace:
    parallel = {
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "data_parallel_size": 1,
        "distributed_executor_backend": "uni",
    }
    parallel.update(settings)
    return SimpleNamespace(parallel_config=SimpleNamespace(**parallel), model_config=SimpleNamespace())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=1; this one has 2"),
        ({"data_parallel_size": 4}, "data_parallel_size=1; this one has 4"),
        (
            {"distributed_executor_backend": "ray"},
            r"\('uni'\) and multiprocess \('mp'\) executors; this engine uses 'ray'",
        ),
        ({"distributed_executor_backend": "external_launcher"}, "this engine uses 'external_launcher'"),
    ],
)
def test_parallel_configurations_kvmem_cannot_back_are_refused_by_name(settings: dict, message: str):
    budget.check_parallel_config(parallel_config())  # TP=1, PP=1, in-process: fine
    # Worker processes and tensor parallelism: the scheduler drives every rank's cache (ranked_cache).
    budget.check_parallel_config(parallel_config(tensor_parallel_size=2, distributed_executor_backend="mp"))
    with pytest.raises(UnsupportedVllmConfigError, match=message):
        budget.check_parallel_config(parallel_config(**settings))


def test_vllms_own_sleep_mode_is_refused():
    vllm_config = parallel_config()
    vllm_config.model_config.enable_sleep_mode = True
    with pytest.raises(UnsupportedVllmConfigError, match=r"kvctl sleep.*instead of vLLM's enable_sleep_mode"):
        budget.check_parallel_config(vllm_config)
