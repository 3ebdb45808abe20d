"""`KvmemCache`: a transformers `Cache` whose keys and values live in kvmem blocks.

Design note
-----------
Storage. One `ElasticKVCache` (layout "NHD": per layer, K and V shaped ``[max_blocks, block_size,
kv_heads, head_dim]``) holds every layer. Each batch row owns a list of block ids (its block
table); a block id is valid in every layer's K and V at once, so the table is shared by all
layers and grows once per step, by whole blocks, as the rows' common length crosses a block
boundary (transformers' `generate` keeps every row of a batch at the same length: shorter prompts
are left-padded). Token ``t`` of row ``b`` lives at block ``table[b][t // block_size]``, offset
``t % block_size``. Blocks go back to kvmem on `reset`, on `close` and when the cache object is
garbage-collected; pages follow as the kvmem cache shrinks (immediately with watermarks of 0).

Growth is atomic: the blocks of a step are allocated for all rows in one `alloc`, before any layer
writes, so when kvmem is out of memory (`KVCacheFull`: limit, budget, capacity) `update` raises
`KvmemCacheFull` with every layer still at the same length. The error does not corrupt the cache:
`reset()` (or a new `generate` after it) works as usual.

What `update` returns depends on the model's attention implementation, read from the config on
every call (so `model.set_attn_implementation` takes effect at once):

- "kvmem_paged" (`kvmem.integrations.transformers.attention`): nothing is gathered. `update` writes the new
  states into their blocks and returns them (views, no copy) tagged with a `PagedKV` descriptor
  (attribute ``kvmem_paged``): the layer's kvmem K/V tensors and each row's runs of consecutive
  blocks. The attention function reads the blocks where they are.
- any other ("sdpa", "eager", ...): HF's attention functions take dense ``[batch, kv_heads, seq,
  head_dim]`` tensors, so `update` gathers the whole K and V into new contiguous tensors: one copy
  of every cached token of the layer, per layer and per step. That is the price of running
  unmodified attention code on paged storage; DynamicCache pays a similar copy in `torch.cat`.

Prefix sharing. An engine that keeps a prompt prefix's blocks (a prefix cache) takes them from a
finished one-row cache with `take_prefix(tokens)` (whole blocks: they become the caller's, and
`reset`/`close` no longer free them) and starts a later request's cache on them with
`borrow_prefix(blocks, tokens)`: the cache begins `tokens` long, `generate` computes only the rest
of the prompt, and the borrowed blocks are read, never written (the prefix ends on a block
boundary, so new tokens go to new blocks) nor freed.

Not supported (they raise): beam search (`reorder_cache`), cropping (assisted decoding) and batch
re-indexing, which would need shared blocks and copy-on-write.

Facts about transformers relied on (transformers 5.23.0 and 5.24.0, `cache_utils.py`): `Cache(layers=...)`
calls each layer's ``update(key_states, value_states)`` with ``[batch, kv_heads, new, head_dim]``
states; `get_mask_sizes(query_length)` returns ``(kv_length, kv_offset)`` and is called before the
step's `update`; ``get_max_length() == -1`` means unbounded; `Cache.reset` calls each layer's
`reset`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvmem.cache import ElasticKVCache, KVCacheFull
from kvmem.integrations.transformers.version import check_transformers_version
from kvmem.session import Session

check_transformers_version()  # before importing from transformers: an unsupported release fails here

from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig  # noqa: E402

ATTENTION_NAME = "kvmem_paged"


class KvmemCacheFull(KVCacheFull):
    """kvmem could not give the blocks a generation step needs; nothing of the step was written.

    Attributes are those of `KVCacheFull` (requested, available, shortfall, reason). Free memory (finish or
    reset other sequences, raise the model's limit) and `reset()` the cache before using it again.
    """


def model_geometry(config: PreTrainedConfig) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a model's decoder, from its config."""
    text = config.get_text_config(decoder=True)
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    return text.num_hidden_layers, num_kv_heads, head_dim


@dataclass(frozen=True)
class PagedKV:
    """Where one layer's cached keys and values are, for a paged attention function.

    Attributes:
        keys: The layer's kvmem K tensor, ``[max_blocks, block_size, kv_heads, head_dim]``.
        values: The layer's kvmem V tensor, same shape.
        runs: Per batch row, its blocks as runs ``(first_block, num_blocks)`` of consecutive ids,
            in token order; together they cover at least `length` tokens.
        length: Tokens cached per row, this step's included.
        block_size: Tokens per block.
    """

    keys: torch.Tensor
    values: torch.Tensor
    runs: list[list[tuple[int, int]]]
    length: int
    block_size: int


class _BlockTable:
    """The block ids of every batch row, shared by all layers. Not thread-safe (one generate at a time)."""

    def __init__(self, kv: ElasticKVCache):
        self.kv = kv
        self.rows: list[list[int]] = []
        self.runs: list[list[tuple[int, int]]] = []
        self._ids = torch.empty((0, 0), dtype=torch.long)
        self.borrowed = 0  # leading blocks of the (single) row that belong to the caller, never freed here

    @property
    def num_blocks(self) -> int:
        return sum(len(row) for row in self.rows)

    def ensure(self, batch: int, tokens: int) -> None:
        """Grow every row to hold `tokens` tokens; all or nothing.

        Raises:
            ValueError: `batch` differs from the batch the table holds.
            KvmemCacheFull: kvmem has not the blocks; the table is unchanged.
        """
        if self.rows and len(self.rows) != batch:
            raise ValueError(
                f"the cache holds {len(self.rows)} sequences, this step has {batch}: reset() the cache "
                "before using it for a different batch"
            )
        have = len(self.rows[0]) if self.rows else 0
        more = -(-tokens // self.kv.block_size) - have
        if more <= 0:
            return
        try:
            ids = self.kv.alloc(batch * more)
        except KVCacheFull as exc:
            raise KvmemCacheFull(
                exc.requested,
                exc.available,
                replace(
                    exc.shortfall,
                    detail=f"growing {batch} sequence(s) to {tokens} tokens; nothing of this step was written, "
                    "reset() the cache to start again",
                ),
            ) from exc
        if not self.rows:
            self.rows = [[] for _ in range(batch)]
        for b, row in enumerate(self.rows):
            row.extend(ids[b * more : (b + 1) * more])
        self._index()

    def _index(self) -> None:
        self.runs = [_runs(row) for row in self.rows]
        self._ids = torch.tensor(self.rows, dtype=torch.long)

    def borrow(self, blocks: list[int]) -> None:
        """Start an empty table as one row beginning with `blocks`, which stay the caller's."""
        if self.rows:
            raise ValueError("borrow_prefix needs an empty cache: reset() it first")
        self.rows, self.borrowed = [list(blocks)], len(blocks)
        self._index()

    def take(self, count: int) -> list[int]:
        """Hand the caller the first `count` blocks of the single row; they are no longer freed here."""
        if len(self.rows) != 1:
            raise ValueError(f"take_prefix needs a cache of one sequence, not {len(self.rows)}")
        if self.borrowed:
            raise ValueError("this cache borrowed its prefix: its blocks are not its own to give")
        if count > len(self.rows[0]):
            raise ValueError(f"the cache holds {len(self.rows[0])} blocks, not {count}")
        self.borrowed = count
        return self.rows[0][:count]

    def slots(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Flat token slots ``block * block_size + offset`` of positions [start, stop), ``[batch, stop - start]``."""
        bs = self.kv.block_size
        positions = torch.arange(start, stop)
        return (self._ids[:, positions // bs] * bs + positions % bs).to(device)

    def release(self) -> None:
        """Give every block back to kvmem, except borrowed ones."""
        blocks = [block for row in self.rows for block in row[self.borrowed :]]
        self.rows, self.runs, self.borrowed = [], [], 0
        self._ids = torch.empty((0, 0), dtype=torch.long)
        if blocks:
            self.kv.free(blocks)


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive block ids, in order, as (first, count)."""
    runs: list[tuple[int, int]] = []
    for block in blocks:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


class KvmemLayer(CacheLayerMixin):
    """One decoder layer's view of a `KvmemCache`: its K/V tensors and its length (made by `KvmemCache`)."""

    def __init__(self, cache: KvmemCache, layer: int):
        super().__init__()
        self._cache = cache
        self.layer = layer
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Check the states fit the kvmem cache (dtype, device, heads, head size)."""
        kv = self._cache.kv
        pool = self._cache.keys(self.layer)
        expected = (kv.num_kv_heads, kv.head_dim)
        for name, states in (("key", key_states), ("value", value_states)):
            if (states.shape[1], states.shape[3]) != expected:
                raise ValueError(
                    f"{name} states of shape {tuple(states.shape)} do not fit the kvmem cache "
                    f"({kv.num_kv_heads} kv heads of size {kv.head_dim})"
                )
            if states.dtype != kv.dtype or states.device != pool.device:
                raise TypeError(
                    f"{name} states are {states.dtype} on {states.device}; the kvmem cache holds {kv.dtype} on "
                    f"{pool.device} (pass dtype= to KvmemCache, or a session on the model's device)"
                )
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's states into their blocks and return what the attention function reads.

        Args:
            key_states: ``[batch, kv_heads, new, head_dim]``.
            value_states: Same shape.

        Returns:
            With the "kvmem_paged" attention: `key_states` and `value_states` as new views (no
            copy), each with attribute ``kvmem_paged`` set to this layer's `PagedKV`. Otherwise:
            the whole cached K and V, ``[batch, kv_heads, length, head_dim]``, gathered into new
            contiguous tensors.

        Raises:
            KvmemCacheFull: kvmem is out of blocks; nothing was written.
            ValueError: The batch size changed without a `reset()`.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self._cache
        batch, heads, new, dim = key_states.shape
        start, stop = self.length, self.length + new
        cache.table.ensure(batch, stop)
        keys, values = cache.keys(self.layer), cache.values(self.layer)
        flat_k, flat_v = keys.view(-1, heads, dim), values.view(-1, heads, dim)
        slots = cache.table.slots(start, stop, keys.device).reshape(-1)
        flat_k.index_copy_(0, slots, key_states.transpose(1, 2).reshape(-1, heads, dim))
        flat_v.index_copy_(0, slots, value_states.transpose(1, 2).reshape(-1, heads, dim))
        self.length = stop
        if cache.paged():
            paged = PagedKV(keys, values, cache.table.runs, stop, cache.kv.block_size)
            new_keys, new_values = key_states.view_as(key_states), value_states.view_as(value_states)
            new_keys.kvmem_paged = new_values.kvmem_paged = paged
            return new_keys, new_values
        return self._gather(flat_k, batch), self._gather(flat_v, batch)

    def _gather(self, flat: torch.Tensor, batch: int) -> torch.Tensor:
        """The first `length` tokens of every row as one contiguous ``[batch, heads, length, dim]`` tensor."""
        _, heads, dim = flat.shape
        rows = flat.view(-1, dim)  # one row per (slot, head): row slot * heads + head
        slots = self._cache.table.slots(0, self.length, flat.device)
        head = torch.arange(heads, device=flat.device)[:, None]
        out = torch.empty((batch, heads, self.length, dim), dtype=flat.dtype, device=flat.device)
        for b in range(batch):
            # Rows in [head, position] order land straight in out[b]: one copy, reading only the rows named.
            torch.index_select(rows, 0, (slots[b][None, :] * heads + head).reshape(-1), out=out[b].view(-1, dim))
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the coming step: every cached token plus the new ones, from 0."""
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        """-1: no fixed maximum (kvmem's capacity, budget and limit bound it; see `KvmemCacheFull`)."""
        return -1

    def reset(self) -> None:
        """Forget this layer's tokens (`KvmemCache.reset` gives the blocks back)."""
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KvmemCache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KvmemCache does not support crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("KvmemCache does not support batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("KvmemCache does not support batch_select_indices")


class KvmemCache(Cache):
    """A transformers `Cache` on kvmem blocks, for ``model.generate(..., cache=cache)`` (before 5.24:
    ``past_key_values=cache``).

    Blocks are allocated as the sequences grow and given back on `reset()`, `close()` or when the
    object is garbage-collected. With ``attn_implementation="kvmem_paged"`` attention reads the
    blocks in place; with other implementations `update` gathers dense K/V (see the module note).

    Args:
        source: A kvmem `Session` (local or connected): the cache makes an `ElasticKVCache` for
            the model on it and closes it in `close()`. Or an `ElasticKVCache` (layout "NHD", the
            model's geometry and dtype): used as is and left open.
        config: The model's config (``model.config``); its decoder gives the geometry, and its
            ``_attn_implementation`` picks what `update` returns.
        block_size: Tokens per block (with a `Session`).
        max_tokens: Virtual capacity in tokens, all sequences together (with a `Session`;
            default: what the device's memory could hold).
        dtype: K/V dtype (with a `Session`); default: the config's dtype, else torch's default.
        **cache_options: Passed to `Session.kv_cache` (watermarks, grow_wait, background).

    Raises:
        ValueError: An `ElasticKVCache` that does not fit the model.
        RuntimeError: The session already has a cache (kvmem allows one per session).
    """

    def __init__(
        self,
        source: Session | ElasticKVCache,
        config: PreTrainedConfig,
        *,
        block_size: int = 16,
        max_tokens: int | None = None,
        dtype: torch.dtype | None = None,
        **cache_options: Any,
    ):
        num_layers, num_kv_heads, head_dim = model_geometry(config)
        self._text_config = config.get_text_config(decoder=True)
        if isinstance(source, Session):
            if dtype is None:
                dtype = getattr(self._text_config, "dtype", None) or torch.get_default_dtype()
            kv = source.kv_cache(
                num_layers, block_size, num_kv_heads, head_dim, dtype, max_tokens, layout="NHD", **cache_options
            )
            owned = kv
        else:
            kv, owned = source, None
            got = (kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.layout)
            if got != (num_layers, num_kv_heads, head_dim, "NHD") or (dtype is not None and dtype != kv.dtype):
                raise ValueError(
                    f"the kvmem cache (layers, kv heads, head dim, layout) = {got}, dtype {kv.dtype} does not fit "
                    f"the model: {(num_layers, num_kv_heads, head_dim, 'NHD')}"
                    + (f", dtype {dtype}" if dtype is not None else "")
                )
        if kv.k is None:
            raise ValueError(f"the kvmem cache on {kv.device.kind} has no torch tensors in this process")
        self.kv = kv
        self.table = _BlockTable(kv)
        self._closed = False
        super().__init__(layers=[KvmemLayer(self, layer) for layer in range(num_layers)])
        # Runs on close() or when this object is collected; holds no reference to self.
        self._release = weakref.finalize(self, _release_storage, self.table, owned)

    def keys(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s kvmem K tensor, ``[max_blocks, block_size, kv_heads, head_dim]``."""
        if self._closed:
            raise RuntimeError("the KvmemCache is closed")
        return self.kv.k[layer]

    def values(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s kvmem V tensor, ``[max_blocks, block_size, kv_heads, head_dim]``."""
        if self._closed:
            raise RuntimeError("the KvmemCache is closed")
        return self.kv.v[layer]

    def paged(self) -> bool:
        """Whether the model attends with "kvmem_paged" (then `update` returns `PagedKV`-tagged states)."""
        return self._text_config._attn_implementation == ATTENTION_NAME

    @property
    def num_blocks(self) -> int:
        """Blocks this cache holds (all rows)."""
        return self.table.num_blocks

    def borrow_prefix(self, blocks: list[int], tokens: int) -> None:
        """Start this empty cache as one sequence whose first `tokens` tokens are cached in `blocks`.

        The blocks stay the caller's (e.g. from `take_prefix` of an earlier cache of the same
        `ElasticKVCache`): this cache reads them and never writes or frees them. Pass the whole
        prompt to ``generate``; only the tokens after the prefix are computed.

        Raises:
            ValueError: The cache is not empty, `tokens` is not a whole number of blocks, or
                `blocks` has not ``tokens // block_size`` ids.
        """
        block_size = self.kv.block_size
        if tokens <= 0 or tokens % block_size or len(blocks) != tokens // block_size:
            raise ValueError(
                f"a borrowed prefix must be whole blocks: {tokens} tokens in {len(blocks)} blocks of {block_size}"
            )
        self.table.borrow(blocks)
        for layer in self.layers:
            layer.length = tokens

    def take_prefix(self, tokens: int) -> list[int]:
        """Take the blocks of this one-sequence cache's first `tokens` tokens (whole blocks) for the caller.

        From here `reset` and `close` free only the blocks after them; the caller frees these
        (``kv.free``) when it no longer needs them, and may `borrow_prefix` them meanwhile.

        Raises:
            ValueError: `tokens` is not a whole number of blocks, exceeds what is cached, the cache
                holds several sequences, or it borrowed its own prefix.
        """
        if tokens <= 0 or tokens % self.kv.block_size or tokens > self.get_seq_length():
            raise ValueError(
                f"take_prefix({tokens}): a whole number of {self.kv.block_size}-token blocks, at most the "
                f"{self.get_seq_length()} tokens cached"
            )
        return self.table.take(tokens // self.kv.block_size)

    def reset(self) -> None:
        """Forget every sequence and give all blocks back to kvmem; the cache stays usable."""
        super().reset()
        self.table.release()

    def close(self) -> None:
        """Give all blocks back and close the `ElasticKVCache` if this cache made it. Idempotent."""
        for layer in self.layers:
            layer.reset()
        self._closed = True
        self._release()

    def __enter__(self) -> KvmemCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release_storage(table: _BlockTable, owned: ElasticKVCache | None) -> None:
    table.release()
    if owned is not None:
        owned.close()
