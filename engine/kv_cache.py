"""KV cache memory and the block manager that hands out its pages.

Pages hold `page_size` token positions of every layer's K and V. The block manager counts
references per page and keeps prefix-cache entries: a full page is keyed by the hash of its tokens
chained with its predecessor's key, so equal prompt prefixes map to the same pages. A page whose
count drops to zero returns to the free list but keeps its key until the page is handed out again,
so a later request (or a preempted one coming back) can still reuse it.

An FP8 cache (`kv_cache_dtype="fp8"`) has one scale per (layer, KV head) for K and for V, fixed at
load: the model runner runs a calibration prefill and takes each head's largest |K| and |V| with
KV_SCALE_HEADROOM to spare (later values beyond it saturate; e4m3 keeps ~6% relative precision down
to 2^-6 of the range, so the headroom costs little). Fixed scales keep pages valid for the prefix
cache and for every request that shares them.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from stepvox.kernels.fp8 import E4M3_MAX

from .sequence import Sequence


def allocate_kv_cache(num_layers: int, num_pages: int, num_kv_heads: int, page_size: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One allocation for the whole cache; per layer a (K, V) pair of [pages, kv_heads, page, dim] views."""
    cache = torch.empty(num_layers, 2, num_pages, num_kv_heads, page_size, head_dim, dtype=dtype, device=device)
    return [(cache[i, 0], cache[i, 1]) for i in range(num_layers)]


KV_SCALE_HEADROOM = 2.0
CALIBRATION_TOKENS = 512


def calibration_token_ids(vocab_size: int, count: int, seed: int = 0) -> torch.Tensor:
    """The calibration prefill's ids: deterministic (every TP rank and every load the same), spread
    over the whole vocabulary (text and audio tokens alike)."""
    return torch.randint(0, vocab_size, (count,), generator=torch.Generator().manual_seed(seed))


def kv_scales_from_absmax(absmax: torch.Tensor, max_value: float = E4M3_MAX,
                          headroom: float = KV_SCALE_HEADROOM) -> torch.Tensor:
    """FP8 scales for values up to `headroom` times the observed largest |x| (a head that saw only
    zeros gets the scale of |x| = 1)."""
    seen = torch.where(absmax > 0, absmax.float(), torch.ones_like(absmax, dtype=torch.float32))
    return seen * headroom / max_value


def kv_page_bytes(num_layers: int, num_kv_heads: int, page_size: int, head_dim: int, dtype: torch.dtype) -> int:
    return num_layers * 2 * num_kv_heads * page_size * head_dim * torch.tensor([], dtype=dtype).element_size()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.page_key: list[int | None] = [None] * num_pages
        self.page_tokens: list[tuple[int, ...] | None] = [None] * num_pages
        self.key_to_page: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))  # oldest first

    # ---------------------------------------------------------------- accounting
    @property
    def num_free_pages(self) -> int:
        return len(self.free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_hold(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) - len(seq.block_table) <= len(self.free)

    # ---------------------------------------------------------------- prefix cache
    def _chain(self, seq: Sequence, upto_pages: int, first: int = 0, key: int | None = None):
        """(key, tokens) of the sequence's full pages first..upto_pages-1; `key` is the key of page
        first-1 (None at the start), so a caller that kept it does not rehash the prefix."""
        ps = self.page_size
        for i in range(first, upto_pages):
            tokens = tuple(seq.token_ids[i * ps:(i + 1) * ps])
            key = hash((key, tokens))
            yield key, tokens

    def admit(self, seq: Sequence) -> int:
        """Attach the cached pages of the longest cached prefix to a sequence that holds none.
        Returns the number of tokens found. At least one token is always left to compute."""
        assert not seq.block_table and seq.num_computed == 0
        hits = self.cached_prefix_pages(seq)
        for page in hits:
            self._ref(page)
        seq.block_table = hits
        seq.page_keys = [self.page_key[p] for p in hits]
        seq.num_computed = len(hits) * self.page_size
        return seq.num_computed

    def cached_prefix_pages(self, seq: Sequence) -> list[int]:
        """The pages `admit` would attach (without attaching them)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key, tokens in self._chain(seq, (seq.num_tokens - 1) // self.page_size):
            page = self.key_to_page.get(key)
            if page is None or self.page_tokens[page] != tokens:
                break
            hits.append(page)
        return hits

    def register_computed(self, seq: Sequence) -> None:
        """Key the sequence's full pages whose K/V are now computed, for reuse by later requests."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed, seq.num_tokens) // self.page_size
        done = len(seq.page_keys)
        if full <= done:
            return
        last = seq.page_keys[-1] if done else None
        for i, (key, tokens) in enumerate(self._chain(seq, full, done, last), start=done):
            page = seq.block_table[i]
            if key not in self.key_to_page and self.page_key[page] is None:
                self.key_to_page[key] = page
                self.page_key[page] = key
                self.page_tokens[page] = tokens
            seq.page_keys.append(key)

    # ---------------------------------------------------------------- allocation
    def _ref(self, page: int) -> None:
        if self.ref_counts[page] == 0:
            del self.free[page]
        self.ref_counts[page] += 1

    def _take_free_page(self) -> int:
        page, _ = self.free.popitem(last=False)   # the least recently freed page
        key = self.page_key[page]
        if key is not None:                       # its cached contents are about to be overwritten
            del self.key_to_page[key]
            self.page_key[page] = None
            self.page_tokens[page] = None
        self.ref_counts[page] = 1
        return page

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give the sequence pages for its first num_tokens positions; False (and no change) if short."""
        need = self.pages_for(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(max(need, 0)):
            seq.block_table.append(self._take_free_page())
        return True

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; pages reaching zero go to the free list (keys kept)."""
        for page in reversed(seq.block_table):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free[page] = None
        seq.block_table = []
        seq.num_computed = 0
        seq.page_keys = []
