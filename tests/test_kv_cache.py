"""The block manager on its own: page accounting, reference counts and the prefix cache (keys of full,
computed pages chained with their predecessor's), plus the KV cache allocation helpers."""
import pytest
import torch

from stepvox.engine.kv_cache import BlockManager, allocate_kv_cache, kv_page_bytes
from stepvox.engine.sampling_params import SamplingParams
from stepvox.engine.sequence import Sequence

PS = 4  # tokens per page in most tests


def seq(tokens, request_id="r") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams())


def prefill(bm: BlockManager, s: Sequence) -> None:
    """What the engine does for a whole-prompt prefill: pages, K/V computed, full pages keyed."""
    assert bm.grow(s, s.num_tokens)
    s.num_computed = s.num_tokens
    bm.register_computed(s)


def admit_and_prefill(bm: BlockManager, s: Sequence) -> int:
    """Attach the cached prefix, then compute the rest; returns the tokens found in the cache."""
    found = bm.admit(s)
    prefill(bm, s)
    return found


def assert_consistent(bm: BlockManager, *holders: Sequence) -> None:
    """Reference counts equal the block tables that hold each page; the free list is the zero-count pages."""
    counts = [0] * bm.num_pages
    for s in holders:
        for p in s.block_table:
            counts[p] += 1
    assert bm.ref_counts == counts
    assert set(bm.free) == {p for p in range(bm.num_pages) if counts[p] == 0}


# ---------------------------------------------------------------- page accounting
@pytest.mark.parametrize("tokens, pages", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_pages_for_rounds_up_to_whole_pages(tokens, pages):
    assert BlockManager(num_pages=8, page_size=PS).pages_for(tokens) == pages


def test_grow_adds_only_the_pages_the_positions_need():
    bm = BlockManager(num_pages=8, page_size=PS)
    s = seq(range(10))
    assert bm.grow(s, 5) and s.block_table == [0, 1]
    assert bm.grow(s, 8) and s.block_table == [0, 1]          # still two pages
    assert bm.grow(s, 3) and s.block_table == [0, 1]          # asking for fewer never shrinks
    assert bm.grow(s, 9) and s.block_table == [0, 1, 2]
    assert bm.num_free_pages == 5
    assert bm.ref_counts[:4] == [1, 1, 1, 0]
    assert_consistent(bm, s)


def test_grow_returns_false_and_changes_nothing_when_pages_are_short():
    bm = BlockManager(num_pages=3, page_size=PS)
    a, b = seq(range(8)), seq(range(8))
    assert bm.grow(a, 8)
    free_before, counts_before = list(bm.free), list(bm.ref_counts)
    assert not bm.grow(b, 8)                                   # needs 2, 1 free
    assert b.block_table == []
    assert list(bm.free) == free_before and bm.ref_counts == counts_before
    assert not bm.grow(a, 13)                                  # a needs 2 more, 1 free
    assert a.block_table == [0, 1] and bm.num_free_pages == 1
    assert bm.grow(a, 12) and bm.num_free_pages == 0           # exactly what is left


def test_can_hold_counts_the_pages_a_sequence_already_has():
    bm = BlockManager(num_pages=3, page_size=PS)
    a = seq(range(8))
    assert bm.grow(a, 8)
    assert bm.can_hold(a, 12) and not bm.can_hold(a, 13)
    assert not bm.can_hold(seq(range(8)), 8) and bm.can_hold(seq(range(4)), 4)


def test_release_returns_pages_and_resets_the_sequence():
    bm = BlockManager(num_pages=6, page_size=PS)
    a, b = seq(range(9), "a"), seq(range(100, 105), "b")
    prefill(bm, a)
    prefill(bm, b)
    assert bm.num_free_pages == 1
    bm.release(a)
    assert a.block_table == [] and a.num_computed == 0 and a.page_keys == []
    assert bm.num_free_pages == 4
    assert_consistent(bm, b)
    bm.release(b)
    assert bm.num_free_pages == bm.num_pages and bm.ref_counts == [0] * 6


def test_freed_pages_are_handed_out_least_recently_freed_first():
    bm = BlockManager(num_pages=5, page_size=PS)
    a, b = seq(range(8), "a"), seq(range(4), "b")
    assert bm.grow(a, 8) and bm.grow(b, 4)
    assert a.block_table == [0, 1] and b.block_table == [2]
    bm.release(a)            # a's tail page goes first, so its head page stays cached the longest
    bm.release(b)
    assert list(bm.free) == [3, 4, 1, 0, 2]
    c = seq(range(20), "c")
    assert bm.grow(c, 20)
    assert c.block_table == [3, 4, 1, 0, 2]


# ---------------------------------------------------------------- reference counts
def test_sequences_with_the_same_full_page_prefix_share_pages():
    bm = BlockManager(num_pages=8, page_size=PS)
    prompt = list(range(9))                                    # two full pages + one token
    a, b = seq(prompt, "a"), seq(prompt, "b")
    admit_and_prefill(bm, a)
    assert admit_and_prefill(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]                # the partial page is private
    shared = a.block_table[:2]
    assert [bm.ref_counts[p] for p in shared] == [2, 2]
    assert bm.ref_counts[a.block_table[2]] == 1 and bm.ref_counts[b.block_table[2]] == 1
    assert bm.num_free_pages == 8 - 4
    assert_consistent(bm, a, b)

    a_private = a.block_table[2]
    bm.release(a)
    assert [bm.ref_counts[p] for p in shared] == [1, 1]
    assert not set(shared) & set(bm.free)                      # still held by b
    assert a_private in bm.free
    assert_consistent(bm, b)

    bm.release(b)
    assert bm.num_free_pages == bm.num_pages
    assert bm.ref_counts == [0] * bm.num_pages


# ---------------------------------------------------------------- prefix cache
def test_register_computed_keys_full_computed_pages_only():
    bm = BlockManager(num_pages=8, page_size=PS)
    s = seq(range(10))
    assert bm.grow(s, 10)
    for computed, keyed in [(0, 0), (3, 0), (5, 1), (7, 1), (8, 2), (10, 2)]:
        s.num_computed = computed
        bm.register_computed(s)
        assert len(s.page_keys) == keyed, computed
        assert [bm.page_key[p] is not None for p in s.block_table] == [i < keyed for i in range(3)]
    assert len(bm.key_to_page) == 2
    assert [bm.key_to_page[k] for k in s.page_keys] == s.block_table[:2]
    assert bm.page_tokens[s.block_table[0]] == (0, 1, 2, 3)
    assert bm.page_tokens[s.block_table[1]] == (4, 5, 6, 7)


def test_register_computed_is_incremental_and_matches_a_single_call():
    bm1, bm2 = BlockManager(8, PS), BlockManager(8, PS)
    s1, s2 = seq(range(13)), seq(range(13))
    assert bm1.grow(s1, 13) and bm2.grow(s2, 13)
    for computed in (2, 4, 9, 12):                            # chunked prefill
        s1.num_computed = computed
        bm1.register_computed(s1)
    s2.num_computed = 12
    bm2.register_computed(s2)
    assert s1.page_keys == s2.page_keys and len(s1.page_keys) == 3


def test_a_later_sequence_with_the_same_prefix_gets_the_cached_pages():
    bm = BlockManager(num_pages=8, page_size=PS)
    a = seq([7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "a")
    admit_and_prefill(bm, a)
    b = seq([7, 1, 2, 3, 4, 5, 6, 7, 99, 98, 97, 96, 95], "b")   # same first 8 tokens
    assert bm.cached_prefix_pages(b) == a.block_table[:2]
    assert b.block_table == []                                 # looking attaches nothing
    assert bm.admit(b) == 8
    assert b.block_table == a.block_table[:2]
    assert b.num_computed == 8
    assert b.page_keys == a.page_keys[:2]
    # b's own third page (tokens 8..11) is new: computing it keys a new page, chained after a's
    prefill(bm, b)
    assert len(b.page_keys) == 3 and b.page_keys[2] != a.page_keys[2]
    assert bm.key_to_page[b.page_keys[2]] == b.block_table[2] != a.block_table[2]


def test_a_prefix_that_differs_inside_the_first_page_is_a_miss():
    bm = BlockManager(num_pages=8, page_size=PS)
    admit_and_prefill(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    assert bm.admit(seq([1, 2, 3, 0, 5, 6, 7, 8, 9], "b")) == 0


def test_equal_page_content_after_a_different_prefix_is_not_a_hit():
    """Keys chain with the predecessor's key: a page matches only at the same place in the same prefix."""
    bm = BlockManager(num_pages=16, page_size=PS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "a")
    admit_and_prefill(bm, a)
    other_first = seq([9, 9, 9, 9, 5, 6, 7, 8, 0], "b")        # a's second page after another first page
    assert bm.cached_prefix_pages(other_first) == []
    shifted = seq([5, 6, 7, 8, 1, 2, 3, 4, 0], "c")            # a's pages in the other order
    assert bm.cached_prefix_pages(shifted) == []
    inserted = seq([1, 2, 3, 4, 9, 9, 9, 9, 5, 6, 7, 8, 0], "d")
    assert bm.cached_prefix_pages(inserted) == a.block_table[:1]
    # computing the same content after a different prefix gives a different key and a page of its own
    admit_and_prefill(bm, other_first)
    assert other_first.page_keys[1] != a.page_keys[1]
    assert bm.key_to_page[other_first.page_keys[1]] == other_first.block_table[1] != a.block_table[1]


@pytest.mark.parametrize("prompt_len, found", [(8, 4), (9, 8), (12, 8), (13, 12)])
def test_at_least_one_token_is_left_to_compute(prompt_len, found):
    bm = BlockManager(num_pages=8, page_size=PS)
    prompt = list(range(100, 100 + prompt_len))
    admit_and_prefill(bm, seq(prompt, "a"))
    b = seq(prompt, "b")
    assert bm.admit(b) == found
    assert b.num_computed == found < b.num_tokens


def test_whole_prompt_cached_with_one_token_pages_leaves_the_last_token():
    bm = BlockManager(num_pages=8, page_size=1)
    admit_and_prefill(bm, seq([5, 6, 7], "a"))
    b = seq([5, 6, 7], "b")
    assert bm.admit(b) == 2 and len(b.block_table) == 2
    assert bm.admit(seq([5], "c")) == 0


def test_a_freed_page_keeps_its_key_and_is_revived():
    bm = BlockManager(num_pages=4, page_size=PS)
    prompt = list(range(9))
    a = seq(prompt, "a")
    admit_and_prefill(bm, a)
    cached = a.block_table[:2]
    keys = list(a.page_keys)
    bm.release(a)
    assert bm.num_free_pages == 4
    assert [bm.page_key[p] for p in cached] == keys            # freed, still keyed
    assert [bm.key_to_page[k] for k in keys] == cached
    b = seq(prompt, "b")
    assert bm.admit(b) == 8
    assert b.block_table == cached
    assert [bm.ref_counts[p] for p in cached] == [1, 1]
    assert not set(cached) & set(bm.free)                      # revived pages leave the free list
    assert bm.num_free_pages == 2
    assert_consistent(bm, b)


def test_unkeyed_free_pages_are_handed_out_before_a_freed_prefix():
    bm = BlockManager(num_pages=4, page_size=PS)
    prompt = list(range(9))
    a = seq(prompt, "a")
    admit_and_prefill(bm, a)                                   # pages 0, 1 keyed; page 2 partial
    bm.release(a)                                              # free order: 3, 2, 1, 0
    x = seq(range(50, 58), "x")
    assert bm.grow(x, 8) and x.block_table == [3, 2]
    assert bm.admit(seq(prompt, "b")) == 8                     # the cached prefix survived


def test_a_freed_page_loses_its_key_when_handed_out_again():
    bm = BlockManager(num_pages=4, page_size=PS)
    prompt = list(range(9))
    a = seq(prompt, "a")
    admit_and_prefill(bm, a)
    first, second = a.block_table[:2]
    k_first, k_second = a.page_keys
    bm.release(a)                                              # free order: 3, 2, second, first
    y = seq(range(50, 62), "y")
    assert bm.grow(y, 12) and y.block_table == [3, 2, second]  # a's second page is overwritten
    assert bm.page_key[second] is None and bm.page_tokens[second] is None
    assert k_second not in bm.key_to_page
    assert bm.key_to_page[k_first] == first and bm.page_key[first] == k_first
    b = seq(prompt, "b")
    assert bm.admit(b) == 4 and b.block_table == [first]       # only the first page is still a hit
    bm.release(b)
    bm.release(y)
    z = seq(range(16), "z")
    assert bm.grow(z, 16)                                      # every page handed out: no key left
    assert bm.key_to_page == {} and bm.page_key == [None] * 4
    bm.release(z)
    assert bm.admit(seq(prompt, "c")) == 0


def test_a_page_whose_stored_tokens_differ_is_not_a_hit():
    """The token check behind the hash: a key collision must not hand out the wrong K/V."""
    bm = BlockManager(num_pages=4, page_size=PS)
    a = seq(range(9), "a")
    admit_and_prefill(bm, a)
    bm.page_tokens[a.block_table[0]] = (0, 1, 2, 99)           # as if another page's tokens hashed alike
    assert bm.cached_prefix_pages(seq(range(9), "b")) == []


def test_concurrent_equal_prefixes_key_the_first_page_computed():
    bm = BlockManager(num_pages=8, page_size=PS)
    prompt = list(range(9))
    a, b = seq(prompt, "a"), seq(prompt, "b")
    assert bm.admit(a) == 0 and bm.admit(b) == 0               # both admitted before either computed
    prefill(bm, a)
    prefill(bm, b)
    assert b.page_keys == a.page_keys                          # b's chain goes on with the same keys
    assert [bm.key_to_page[k] for k in a.page_keys] == a.block_table[:2]
    assert [bm.page_key[p] for p in b.block_table] == [None] * 3
    assert bm.admit(seq(prompt, "c")) == 8


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_pages=8, page_size=PS, enable_prefix_caching=False)
    prompt = list(range(9))
    a = seq(prompt, "a")
    assert admit_and_prefill(bm, a) == 0
    assert a.page_keys == [] and bm.key_to_page == {} and bm.page_key == [None] * 8
    b = seq(prompt, "b")
    assert bm.cached_prefix_pages(b) == []
    assert bm.admit(b) == 0 and b.block_table == [] and b.num_computed == 0
    bm.release(a)
    assert bm.admit(seq(prompt, "c")) == 0


# ---------------------------------------------------------------- KV cache memory
@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_kv_page_bytes(dtype, size):
    # layers * (K and V) * kv heads * page * head dim * element size
    want = 3 * 2 * 2 * 16 * 8 * size
    assert kv_page_bytes(num_layers=3, num_kv_heads=2, page_size=16, head_dim=8, dtype=dtype) == want


def test_allocate_kv_cache_gives_per_layer_k_v_page_views_of_one_allocation():
    layers, pages, heads, ps, dim = 3, 5, 2, 4, 8
    cache = allocate_kv_cache(layers, pages, heads, ps, dim, torch.bfloat16, torch.device("cpu"))
    assert len(cache) == layers
    for k, v in cache:
        assert k.shape == v.shape == (pages, heads, ps, dim)
        assert k.dtype == v.dtype == torch.bfloat16 and k.device.type == "cpu"
        assert k.is_contiguous() and v.is_contiguous()
    storage = cache[0][0].untyped_storage()
    assert all(t.untyped_storage().data_ptr() == storage.data_ptr() for kv in cache for t in kv)
    assert storage.nbytes() == pages * kv_page_bytes(layers, heads, ps, dim, torch.bfloat16)
    # the 2 * layers views tile the allocation without overlapping
    starts = sorted(t.data_ptr() for kv in cache for t in kv)
    view_bytes = pages * heads * ps * dim * 2
    assert [b - a for a, b in zip(starts, starts[1:])] == [view_bytes] * (2 * layers - 1)
    for kv in cache:
        for t in kv:
            t.fill_(0)
    cache[1][1][2].fill_(1)                                    # layer 1, V, page 2
    sums = [[float(t.float().sum()) for t in kv] for kv in cache]
    assert sums == [[0, 0], [0, heads * ps * dim], [0, 0]]
