"""SGLang's paged allocator with its free pages from kvmem: `KvmemPagedTokenToKVPoolAllocator`.

Design note
-----------
SGLang 0.5.23 `PagedTokenToKVPoolAllocator` (sglang/srt/mem_cache/allocator/paged.py) keeps its
free pages in one tensor, ``free_pages`` (page ids, starting at 1: page 0 is the padding page).
`alloc(need_size)`, `alloc_extend(...)` and `alloc_decode(...)` hand out the first pages of it (the
extend/decode kernels read ``free_pages[i]`` for the i-th new page) and then drop them from the
front; every way of freeing (`free`, `free_segment`, `free_page_ids`, `free_group_end`) ends in
`_release_page_ids(*page_ids)`. Running out is answered by returning None, which SGLang's callers
(sglang/srt/mem_cache/allocation.py) report as out of memory; the scheduler reads
`available_size()` to admit work and, before each decode step, `check_decode_capacity`, which
retracts requests instead of failing in alloc.

Here ``free_pages`` is only the *stash*: pages taken from kvmem and not yet handed to a request.
Before each alloc the stash is topped up with exactly the pages that alloc hands out (the count
SGLang's own `get_num_new_pages` gives, from the CPU length tensors), taken from the pool's kvmem
cache with `ElasticKVCache.alloc`: kvmem page ``p`` is SGLang page ``p`` (pool.py), and kvmem maps
memory as its blocks are taken. Then SGLang's own code and kernels run unchanged on the stash.
Freed pages go straight back to kvmem (`ElasticKVCache.free`), whose page-aware allocator packs
live blocks so that whole page slots empty out; its background thread unmaps empty slots beyond
its high watermark and returns their pages to the daemon. (With need_sort, used in PD
disaggregation, SGLang stages freed pages and sorts them before reuse; kvmem hands out the lowest
free blocks of the fullest slots, so no staging is needed.)

Out of memory (kvmem's limit or budget, or SGLang's own token cap) is `None` from the alloc call,
exactly as when SGLang's own free list runs dry; nothing is taken then. `available_size()` counts
the stash, kvmem's mapped free blocks and an estimate of what kvmem could still grow by
(`KvmemMHATokenToKVPool.headroom_blocks`), capped by SGLang's token cap: so SGLang admits and
retracts on what kvmem can give, and elasticity (growing into pages other models left idle) is
kept. It is an estimate: only the alloc call knows for sure.

Freeing converts page ids to a Python list (`.tolist()`), which synchronizes a CUDA device; the
in-tree `free` already synchronizes for its `torch.unique`.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.utils import get_num_new_pages

from kvmem.cache import KVCacheFull
from kvmem.integrations.sglang.drain import install_scheduler_drain
from kvmem.integrations.sglang.pool import KvmemMHATokenToKVPool
from kvmem.integrations.sglang.version import UnsupportedSglangError


class KvmemPagedTokenToKVPoolAllocator(PagedTokenToKVPoolAllocator):
    """`PagedTokenToKVPoolAllocator` whose free pages come from kvmem; see the module docstring.

    Constructed by SGLang with the in-tree arguments (through the platform's
    `get_paged_allocator_cls`); `kvcache` must be a `KvmemMHATokenToKVPool`.

    Raises:
        UnsupportedSglangError: `kvcache` is not a kvmem pool, or `size` exceeds its capacity.
    """

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, device: str, kvcache, need_sort: bool):
        if not isinstance(kvcache, KvmemMHATokenToKVPool):
            raise UnsupportedSglangError(
                f"kvmem's paged allocator allocates from a KvmemMHATokenToKVPool, not a {type(kvcache).__name__} "
                "(only plain MHA pools are on kvmem; unset KVMEM for this model)"
            )
        if page_size != kvcache.page_size:
            raise UnsupportedSglangError(
                f"kvmem's paged allocator needs the pool's page size ({kvcache.page_size}), not {page_size} "
                "(decode context parallelism widens SGLang's allocator pages; it is not supported)"
            )
        kvcache.claim(self)
        install_scheduler_drain()  # kvctl sleep drains SGLang's scheduler (drain.py)
        self.kv = kvcache.kv
        # Which kvmem blocks this allocator holds (stash and requests), for `clear`; CPU, like kvmem's ids.
        self._held = torch.zeros(self.kv.max_blocks, dtype=torch.bool)
        self._num_held = 0
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)  # calls clear()
        if self.num_pages > self.kv.max_blocks - 1:
            raise UnsupportedSglangError(
                f"the allocator's {self.num_pages} pages do not fit the kvmem pool's {self.kv.max_blocks - 1}"
            )

    # ---- taking pages from kvmem ----

    def _stock(self, num_pages: int) -> bool:
        """Top the stash up to `num_pages` pages from kvmem; False (nothing taken) if there are not so many."""
        short = num_pages - len(self.free_pages)
        if short <= 0:
            return True
        if self._num_held + short > self.num_pages:
            return False  # SGLang's own cap on the pages it may hold
        try:
            ids = self.kv.alloc(short)
        except KVCacheFull:
            return False
        taken = torch.tensor(ids, dtype=torch.int64)
        self._held[taken] = True
        self._num_held += short
        self.free_pages = torch.cat((self.free_pages, taken.to(self.device)))
        return True

    def alloc(self, need_size: int):
        if not self._stock(need_size // self.page_size):
            return None
        return super().alloc(need_size)

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        num_new_pages: int | None = None,
    ):
        if num_new_pages is None:
            num_new_pages = get_num_new_pages(
                seq_lens=seq_lens_cpu, page_size=self.page_size, prefix_lens=prefix_lens_cpu
            )
        if not self._stock(num_new_pages):
            return None
        # paged.py alloc_extend: given num_new_pages and a free list at least that deep, it runs the
        # kernel on the free list's first pages and drops exactly num_new_pages from its front.
        return super().alloc_extend(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens, num_new_pages
        )

    def alloc_decode(self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor):
        if not self._stock(get_num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size, decode=True)):
            return None
        return super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)

    # ---- giving pages back ----

    def _release_page_ids(self, *page_ids: torch.Tensor) -> None:
        """Where every free ends (paged.py): the pages go back to kvmem at once.

        Raises:
            ValueError: A page is the padding page, or not held (freed twice); nothing is freed then.
        """
        ids = torch.cat(page_ids).cpu() if len(page_ids) > 1 else page_ids[0].cpu()
        if ids.numel() == 0:
            return
        if not bool(self._held[ids].all()):
            bad = ids[~self._held[ids]][0].item()
            what = "SGLang's padding page, never allocated" if bad == 0 else "not allocated (freed twice?)"
            raise ValueError(f"free of page {bad}: it is {what}")
        self.kv.free(ids.tolist())  # also refuses duplicates within the batch, before changing anything
        self._held[ids] = False
        self._num_held -= ids.numel()

    def forget_pages(self) -> None:
        """kvmem freed every block (an offloaded cache was lost on wake): hold nothing, free nothing."""
        self._held.zero_()
        self._num_held = 0
        self.free_pages = torch.empty((0,), dtype=torch.int64, device=self.device)

    def clear(self) -> None:
        """Give every page this allocator holds back to kvmem and start empty (SGLang's flush and resize)."""
        held = self._held.nonzero().flatten()
        if held.numel():
            self.kv.free(held.tolist())
            self._held[held] = False
        self._num_held = 0
        self.free_pages = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.free_group = None
        self.free_page_ids_group = []
        self.staged_pages = []
        self.num_staged_pages = 0

    # ---- what SGLang reads ----

    def available_size(self) -> int:
        """Tokens that could be allocated now: the stash, kvmem's mapped free blocks and its growth
        headroom, capped by SGLang's token cap (an estimate; see the module docstring)."""
        stash = len(self.free_pages)
        in_requests = self._num_held - stash
        could = stash + self.kv.get_num_free_blocks() + self._kvcache.headroom_blocks()
        return max(0, min(self.num_pages - in_requests, could)) * self.page_size

    def held_pages(self) -> int:
        """Pages this allocator holds from kvmem: the stash and those handed to requests."""
        return self._num_held
