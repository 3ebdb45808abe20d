"""The "kvmem_paged" attention: transformers attention that reads a `KvmemCache`'s blocks in place.

Design note
-----------
`KvmemCache.update` returns, under this attention, only the step's new states tagged with a
`PagedKV`: the layer's kvmem K/V tensors and each batch row's runs of consecutive block ids. For
each row and each run, the run's tokens are one strided view of the kvmem tensor (blocks
``first .. first + n`` of an "NHD" tensor are ``n * block_size`` consecutive tokens), so scores
and the weighted sum are computed with `torch.matmul` on views; runs are combined with an online
softmax (running maximum, running normaliser, rescaled accumulator), as flash attention does
across its tiles. A request whose blocks are consecutive is one run, hence one pair of matmuls.

What it copies per layer and step: with a float32 cache, no cached key or value; with a 16-bit
cache, each run's keys and values are upcast to float32 one run at a time (a copy of that run
only), since scores and sums accumulate in float32. Besides, it allocates the query reshaped per
row, the scores of one run (``[kv_heads, groups * query_len, run_tokens]``), the float32
accumulator and the output. (torch's matmul may pack a strided operand internally, as BLAS does.)
Reference code for CPU and for checking kernels: it loops over rows and runs in Python; a GPU
engine would hand the same tensors and block table to a paged-attention kernel.

Masking follows transformers' sdpa convention: the mask registered for this name is
`masking_utils.sdpa_mask` (boolean, True = attend, ``[batch, 1, query_len, kv_len]``, or None
when the pattern is plainly causal), so padding and sliding windows come with the mask; without a
mask the function applies the causal rule itself. A query that may attend to nothing (a pad
token) gets zeros, never NaN.

Without a `KvmemCache` (a forward without cache, or continuous batching, which passes its own
``cache``) the call is passed to transformers' sdpa attention, which takes the same mask.

Facts about transformers relied on (5.23.0 and 5.24.0): an attention function is called as
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` with query
``[batch, heads, query_len, head_dim]`` and returns ``(output [batch, query_len, heads, head_dim],
weights or None)`` (`integrations/sdpa_attention.py`); `AttentionInterface.register` and
`AttentionMaskInterface.register` are global registries keyed by ``config._attn_implementation``
(`modeling_utils.py`, `masking_utils.py`); without a registered mask function no mask is built.
"""

from __future__ import annotations

from typing import Any

import torch

from kvmem.integrations.transformers.cache import ATTENTION_NAME, PagedKV  # checks the transformers version first

# isort: off
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
# isort: on


def kvmem_paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the kvmem blocks named by ``key.kvmem_paged`` (see the module note).

    Args:
        module: The attention module (read for `training` only).
        query: ``[batch, heads, query_len, head_dim]``.
        key: This step's keys as returned by `KvmemCache.update` (tagged with a `PagedKV`).
        value: This step's values, likewise.
        attention_mask: Boolean ``[batch, 1, query_len, kv_len]`` (True = attend), an additive
            float mask of that shape, or None for plain causal attention.
        scaling: Score scale; default ``head_dim ** -0.5``.
        dropout: Must be 0 (inference only).

    Returns:
        ``(output [batch, query_len, heads, head_dim], None)``.

    Raises:
        NotImplementedError: Dropout in training, soft-capping or attention sinks.
    """
    paged: PagedKV | None = getattr(key, "kvmem_paged", None)
    if paged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout and module.training:
        raise NotImplementedError("kvmem_paged attention is for inference: no dropout")
    if kwargs.get("softcap") is not None or hasattr(module, "sinks"):
        raise NotImplementedError("kvmem_paged attention supports neither soft-capping nor attention sinks")
    batch, heads, query_len, head_dim = query.shape
    kv_heads = paged.keys.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    length, block_size = paged.length, paged.block_size
    query_pos = torch.arange(length - query_len, length, device=query.device)
    out = torch.empty((batch, query_len, heads, head_dim), dtype=query.dtype, device=query.device)
    for b in range(batch):
        # Query heads h * groups .. h * groups + groups - 1 share kv head h (transformers' repeat_kv order).
        q = query[b].reshape(kv_heads, groups * query_len, head_dim).float()
        best = torch.full((kv_heads, groups * query_len, 1), -torch.inf, dtype=torch.float32, device=query.device)
        total = torch.zeros_like(best)
        acc = torch.zeros((kv_heads, groups * query_len, head_dim), dtype=torch.float32, device=query.device)
        start = 0
        for first, count in paged.runs[b]:
            stop = min(start + count * block_size, length)
            if stop <= start:
                break
            n = stop - start
            k = paged.keys[first : first + count].view(-1, kv_heads, head_dim)[:n].permute(1, 2, 0)
            v = paged.values[first : first + count].view(-1, kv_heads, head_dim)[:n].transpose(0, 1)
            scores = torch.matmul(q, k.float()).mul_(scale).view(kv_heads, groups, query_len, n)
            _apply_mask(scores, attention_mask, b, start, stop, query_pos)
            scores = scores.view(kv_heads, groups * query_len, n)
            new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
            # A row that attended to nothing yet keeps a maximum of -inf: shift it by 0 instead.
            shift = torch.where(torch.isinf(new_best), torch.zeros_like(new_best), new_best)
            weights = torch.exp(scores - shift)
            rescale = torch.exp(best - shift)
            total = total * rescale + weights.sum(-1, keepdim=True)
            acc = acc * rescale + torch.matmul(weights, v.float())
            best = new_best
            start = stop
        result = acc / torch.where(total > 0, total, torch.ones_like(total))
        out[b] = result.view(heads, query_len, head_dim).transpose(0, 1)
    return out, None


def _apply_mask(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    row: int,
    start: int,
    stop: int,
    query_pos: torch.Tensor,
) -> None:
    """Mask `scores` ``[kv_heads, groups, query_len, stop - start]`` in place for keys [start, stop) of `row`."""
    if mask is None:
        key_pos = torch.arange(start, stop, device=scores.device)
        scores.masked_fill_(key_pos[None, :] > query_pos[:, None], -torch.inf)
    elif mask.dtype == torch.bool:
        scores.masked_fill_(~mask[row, 0, :, start:stop], -torch.inf)
    else:
        scores.add_(mask[row, 0, :, start:stop].float())


def register() -> None:
    """Register "kvmem_paged" with transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvmem_paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
