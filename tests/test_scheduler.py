"""The scheduler on its own, driven as the engine drives it: continuous batching with chunked
prefill under a token budget, admission limited by sequences and pages (cached prefixes attached),
preemption by recompute when decodes run out of pages, planning a decode step ahead, and finish()."""
import itertools
import random

import pytest

from stepvox.engine.kv_cache import BlockManager
from stepvox.engine.sampling_params import SamplingParams
from stepvox.engine.scheduler import ChunkPlan, Scheduler, SchedulerOutput
from stepvox.engine.sequence import Sequence, SequenceStatus

PS = 4  # tokens per page

_next_token = itertools.count(1000)


def make(num_pages=16, max_num_seqs=8, budget=64, page_size=PS, caching=True, prefill_cap=None) -> Scheduler:
    bm = BlockManager(num_pages, page_size, enable_prefix_caching=caching)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     max_prefill_while_decoding=prefill_cap)


def seq(n, request_id="r", first=0) -> Sequence:
    """A sequence whose prompt is the n tokens first, first+1, ..."""
    return Sequence(request_id, list(range(first, first + n)), SamplingParams())


def add(s: Scheduler, *seqs: Sequence) -> None:
    for q in seqs:
        s.add(q)


def apply(s: Scheduler, out: SchedulerOutput | None) -> None:
    """What the engine does once a step has run: K/V computed, one token per sampling chunk, full pages keyed."""
    if out is None:
        return
    sampling = [c for c in out.chunks if c.samples]
    for c in out.chunks:
        c.seq.num_computed += c.length
    for c in sampling:
        c.seq.token_ids.append(next(_next_token))
    for c in out.chunks:
        s.bm.register_computed(c.seq)


def shape(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(request, start, length, samples) per chunk, in order. Take it before `apply`: a chunk's
    `samples` compares with the sequence's length, which the sampled token changes."""
    return [(c.seq.request_id, c.start, c.length, c.samples) for c in out.chunks]


def step(s: Scheduler) -> SchedulerOutput:
    """schedule() and apply(); the output's `rows` is its shape as scheduled."""
    out = s.schedule()
    out.rows = shape(out)
    apply(s, out)
    return out


def check_pages(s: Scheduler) -> None:
    """Reference counts equal the running sequences' block tables; waiting sequences hold no pages."""
    counts = [0] * s.bm.num_pages
    for q in s.running:
        for p in q.block_table:
            counts[p] += 1
    assert s.bm.ref_counts == counts
    assert s.bm.num_free_pages == counts.count(0)
    for q in s.waiting:
        assert q.block_table == [] and q.num_computed == 0 and q.status == SequenceStatus.WAITING


# ---------------------------------------------------------------- batching and chunked prefill
def test_a_long_prompt_is_prefilled_in_chunks_over_several_steps():
    s = make(budget=8)
    a = seq(20, "a")
    add(s, a)
    assert step(s).rows == [("a", 0, 8, False)]
    assert a.num_computed == 8 and a.num_tokens == 20 and len(a.block_table) == 2
    assert step(s).rows == [("a", 8, 8, False)]
    assert step(s).rows == [("a", 16, 4, True)]              # the last chunk samples
    assert a.num_tokens == 21 and a.num_output_tokens == 1
    assert step(s).rows == [("a", 20, 1, True)]              # then one token per decode
    assert step(s).rows == [("a", 21, 1, True)]
    assert len(a.block_table) == s.bm.pages_for(22)
    check_pages(s)


def test_running_sequences_are_served_before_waiting_ones():
    s = make(budget=8)
    a, b, c = seq(6, "a"), seq(10, "b", 100), seq(10, "c", 200)
    add(s, a, b)
    out = step(s)
    assert out.rows == [("a", 0, 6, True), ("b", 0, 2, False)]   # b admitted with what is left
    assert out.num_tokens == 8 and out.preempted == []
    add(s, c)
    assert step(s).rows == [("a", 6, 1, True), ("b", 2, 7, False)]
    assert list(s.waiting) == [c]                              # no budget left for c
    assert step(s).rows == [("a", 7, 1, True), ("b", 9, 1, True), ("c", 0, 6, False)]
    assert step(s).rows == [("a", 8, 1, True), ("b", 10, 1, True), ("c", 6, 4, True)]
    assert step(s).rows == [("a", 9, 1, True), ("b", 11, 1, True), ("c", 10, 1, True)]
    assert s.running == [a, b, c] and not s.waiting
    assert all(q.status == SequenceStatus.RUNNING for q in (a, b, c))
    check_pages(s)


def test_the_budget_cuts_the_running_sequences_in_admission_order():
    s = make(budget=8)
    a, b = seq(5, "a"), seq(12, "b", 100)
    add(s, a)
    step(s)
    add(s, b)
    assert step(s).rows == [("a", 5, 1, True), ("b", 0, 7, False)]
    assert step(s).rows == [("a", 6, 1, True), ("b", 7, 5, True)]


def test_chunk_plan_carries_the_tokens_positions_and_pages():
    s = make(budget=8)
    a = seq(10, "a", first=50)
    add(s, a)
    out = step(s)
    step(s)
    plan = s.schedule().chunks[0].plan()
    assert isinstance(plan, ChunkPlan)
    assert plan.tokens == a.token_ids[10:11] and plan.start == 10 and plan.length == 1
    assert plan.block_table == a.block_table and plan.samples
    first = out.chunks[0].plan()
    assert first.tokens == list(range(50, 58)) and first.start == 0 and not first.samples


def test_an_empty_scheduler_schedules_nothing():
    s = make()
    out = s.schedule()
    assert out.is_empty and out.num_tokens == 0 and out.preempted == []
    assert not s.has_unfinished()
    s.add(seq(3))
    assert s.has_unfinished()


# ---------------------------------------------------------------- admission
def test_max_num_seqs_limits_admission():
    s = make(max_num_seqs=2)
    a, b, c = seq(3, "a"), seq(3, "b", 10), seq(3, "c", 20)
    add(s, a, b, c)
    assert [ch.seq for ch in step(s).chunks] == [a, b]
    assert list(s.waiting) == [c] and c.status == SequenceStatus.WAITING and c.block_table == []
    assert [ch.seq for ch in step(s).chunks] == [a, b]         # still full
    s.finish(a, "stop")
    assert step(s).rows == [("b", 4, 1, True), ("c", 0, 3, True)]
    assert s.running == [b, c]


def test_admission_waits_while_pages_are_short():
    s = make(num_pages=4)
    a, b, c = seq(10, "a"), seq(8, "b", 100), seq(2, "c", 200)
    add(s, a, b, c)
    out = step(s)
    # a takes 3 pages; b needs 2 and 1 is free; c would fit, but the queue is served in order
    assert out.rows == [("a", 0, 10, True)]
    assert list(s.waiting) == [b, c]
    assert b.block_table == [] and b.status == SequenceStatus.WAITING
    assert step(s).rows == [("a", 10, 1, True)]              # a's third page still has room
    check_pages(s)
    s.finish(a, "stop")
    assert step(s).rows == [("b", 0, 8, True), ("c", 0, 2, True)]
    check_pages(s)


def test_admission_asks_pages_only_for_the_first_chunk():
    s = make(num_pages=4, budget=5)
    a, b = seq(9, "a"), seq(8, "b", 100)
    add(s, a)
    step(s)                                                    # a: 5 tokens in 2 pages
    add(s, b)
    out = step(s)                                              # a's last 4 prompt tokens: 3 pages; 1 free
    assert out.rows == [("a", 5, 4, True), ("b", 0, 1, False)]
    assert len(b.block_table) == 1 and s.bm.num_free_pages == 0


def test_admission_attaches_the_cached_prompt_prefix():
    s = make()
    prompt = list(range(10))
    a = Sequence("a", prompt, SamplingParams())
    add(s, a)
    step(s)
    b = Sequence("b", prompt + [77, 78], SamplingParams())
    add(s, b)
    out = step(s)
    assert out.rows == [("a", 10, 1, True), ("b", 8, 4, True)]
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == 8
    assert [s.bm.ref_counts[p] for p in a.block_table[:2]] == [2, 2]
    check_pages(s)


def test_admission_revives_a_cached_prefix_from_the_free_list():
    s = make(num_pages=4)
    prompt = list(range(9))
    r, a = seq(2, "r", 500), Sequence("a", prompt, SamplingParams())
    add(s, r, a)
    step(s)                                                    # r: 1 page, a: 3 pages (2 keyed)
    cached = a.block_table[:2]
    s.finish(a, "stop")
    assert s.bm.num_free_pages == 3
    b = Sequence("b", prompt[:8] + [40], SamplingParams())       # cached prefix + 1 token: 1 new page
    add(s, b)
    assert step(s).rows == [("r", 2, 1, True), ("b", 8, 1, True)]
    assert b.block_table[:2] == cached and b.num_cached_tokens == 8
    check_pages(s)


def test_admission_does_not_count_free_pages_holding_the_cached_prefix_as_free():
    """Three pages are free, but two of them are the prefix being revived: one is left for new data."""
    s = make(num_pages=4)
    prompt = list(range(9))
    r, a = seq(2, "r", 500), Sequence("a", prompt, SamplingParams())
    add(s, r, a)
    step(s)
    cached = a.block_table[:2]
    s.finish(a, "stop")
    b = Sequence("b", prompt[:8] + [40, 41, 42, 43, 44], SamplingParams())   # needs 2 new pages
    add(s, b)
    assert step(s).rows == [("r", 2, 1, True)]
    assert list(s.waiting) == [b] and b.block_table == []
    assert s.bm.num_free_pages == 3 and all(s.bm.page_key[p] is not None for p in cached)
    s.finish(r, "stop")
    assert step(s).rows == [("b", 8, 5, True)]
    assert b.block_table[:2] == cached
    check_pages(s)


# ---------------------------------------------------------------- preemption
def test_decode_out_of_pages_preempts_the_most_recently_admitted():
    s = make(num_pages=4, max_num_seqs=3)
    a, b, c, d = seq(4, "a"), seq(4, "b", 100), seq(4, "c", 200), seq(4, "d", 300)
    add(s, a, b, c, d)
    step(s)                                                    # a, b, c: one full page each; d waits
    assert s.running == [a, b, c] and list(s.waiting) == [d]
    out = step(s)                                              # each decode needs a second page; 1 free
    assert out.rows == [("a", 4, 1, True), ("b", 4, 1, True)]
    assert out.preempted == [c]
    assert s.running == [a, b]
    assert list(s.waiting) == [c, d]                           # at the front, ahead of d
    assert c.status == SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.block_table == [] and c.num_computed == 0 and c.page_keys == []
    assert c.token_ids == list(range(200, 204)) + [c.token_ids[4]] and c.num_output_tokens == 1
    assert a.num_preemptions == b.num_preemptions == 0
    check_pages(s)


def test_a_preempted_sequence_is_recomputed_with_its_output_so_far():
    s = make(num_pages=4, max_num_seqs=3, caching=False)
    a, b, c = seq(4, "a"), seq(4, "b", 100), seq(4, "c", 200)
    add(s, a, b, c)
    step(s)
    assert step(s).preempted == [c]
    s.finish(a, "stop")
    s.finish(b, "stop")
    out = s.schedule()
    assert shape(out) == [("c", 0, 5, True)]                   # prompt + the token it had made
    assert out.chunks[0].plan().tokens == c.token_ids
    assert c.num_cached_tokens == 0
    apply(s, out)
    assert c.num_output_tokens == 2 and c.num_computed == 5
    assert step(s).rows == [("c", 5, 1, True)]


def test_no_admission_in_a_step_that_preempts():
    s = make(num_pages=3, budget=5, caching=False)
    a, c = seq(4, "a"), seq(5, "c", 200)
    add(s, a, c)
    assert step(s).rows == [("a", 0, 4, True), ("c", 0, 1, False)]
    out = step(s)
    # a takes the last free page; c's next chunk needs a second page, so c preempts itself. Its
    # first chunk would fit the page it frees, but a step that preempts admits nobody.
    assert out.rows == [("a", 4, 1, True)] and out.preempted == [c]
    assert s.running == [a] and list(s.waiting) == [c] and s.bm.num_free_pages == 1
    assert step(s).rows == [("a", 5, 1, True), ("c", 0, 4, False)]


def test_preemptions_cascade_and_the_waiting_queue_keeps_admission_order():
    s = make(num_pages=3, max_num_seqs=3)
    a, b, c = seq(4, "a"), seq(4, "b", 100), seq(4, "c", 200)
    add(s, a, b, c)
    step(s)                                                    # no page free
    out = step(s)
    # a takes c's page; b then finds none and, being the newest left, is preempted itself
    assert out.rows == [("a", 4, 1, True)]
    assert out.preempted == [c, b]
    assert s.running == [a] and list(s.waiting) == [b, c]
    assert b.num_preemptions == c.num_preemptions == 1
    check_pages(s)


def test_a_lone_sequence_that_cannot_grow_preempts_itself():
    s = make(num_pages=1)
    a = seq(4, "a")
    add(s, a)
    step(s)
    out = s.schedule()
    assert out.is_empty and out.preempted == [a]
    assert s.running == [] and list(s.waiting) == [a]
    assert s.bm.num_free_pages == 1


def test_a_preempted_sequence_revives_its_own_cached_pages():
    s = make(num_pages=5)
    a, b = seq(4, "a"), seq(8, "b", 100)
    add(s, a, b)
    for _ in range(5):
        step(s)                                                # a and b grow a page each on the way
    assert (a.num_tokens, b.num_tokens, s.bm.num_free_pages) == (9, 13, 0)
    b_pages = list(b.block_table)
    out = step(s)                                              # a's 9th position needs a third page
    assert out.preempted == [b] and out.rows == [("a", 8, 1, True)]
    assert a.block_table[2] == b_pages[2]                      # b's tail page, freed first, went to a
    assert all(s.bm.page_key[p] is not None for p in b_pages[:2])
    # b's head pages are free but hold its prefix: reviving them leaves no page for the rest
    assert step(s).rows == [("a", 9, 1, True)]
    assert list(s.waiting) == [b]
    s.finish(a, "stop")
    out = step(s)
    assert out.rows == [("b", 8, 5, True)]                     # recomputes from its first uncached page
    assert b.block_table[:2] == b_pages[:2]
    assert b.num_cached_tokens == 0                            # counted at first admission only
    check_pages(s)


# ---------------------------------------------------------------- scheduling ahead
def ahead_step(s: Scheduler) -> tuple[SchedulerOutput, SchedulerOutput | None]:
    """A step as the engine runs it with async scheduling: the next decode is planned before the
    sampled tokens are known, then the step's results are applied, then the ahead step's."""
    out = s.schedule()
    out.rows = shape(out)
    ahead = s.schedule_ahead([c for c in out.chunks if c.samples])
    apply(s, out)
    return out, ahead


def test_schedule_ahead_plans_one_placeholder_decode_per_sequence():
    s = make()
    a, b = seq(6, "a"), seq(3, "b", 100)
    add(s, a, b)
    out = s.schedule()
    ahead = s.schedule_ahead(out.chunks)
    assert ahead is not None and ahead.preempted == []
    # planned before the sampled tokens exist: the chunks sample because they are ahead
    assert (a.num_tokens, b.num_tokens) == (6, 3)
    assert [(c.seq, c.start, c.length, c.ahead, c.samples) for c in ahead.chunks] == \
        [(a, 6, 1, True, True), (b, 3, 1, True, True)]
    plan = ahead.chunks[0].plan()
    assert plan.tokens == [0] and plan.start == 6 and plan.samples and plan.block_table == a.block_table
    apply(s, out)
    apply(s, ahead)
    assert (a.num_computed, a.num_tokens, b.num_computed, b.num_tokens) == (7, 8, 4, 5)
    assert shape(s.schedule()) == [("a", 7, 1, True), ("b", 4, 1, True)]


def test_schedule_ahead_chains_over_its_own_chunks_and_grows_pages():
    s = make()
    a = seq(3, "a")
    add(s, a)
    out = s.schedule()
    sampled = out.chunks
    for expect_start in (3, 4, 5, 6):
        ahead = s.schedule_ahead(sampled)
        assert [(c.start, c.length, c.ahead) for c in ahead.chunks] == [(expect_start, 1, True)]
        assert len(a.block_table) == s.bm.pages_for(expect_start + 1)
        apply(s, out)
        out, sampled = ahead, ahead.chunks
    apply(s, out)
    assert a.num_computed == 7 and a.num_tokens == 8 and len(a.block_table) == 2
    check_pages(s)


def test_schedule_ahead_admits_waiting_sequences_after_the_decodes():
    s = make(max_num_seqs=2)
    a = seq(3, "a")
    add(s, a)
    out = s.schedule()
    b, c = seq(5, "b", 100), seq(4, "c", 200)
    add(s, b, c)                        # arrive while a's step runs
    ahead = s.schedule_ahead(out.chunks)
    assert [(x.seq, x.start, x.length, x.ahead) for x in ahead.chunks] == [(a, 3, 1, True), (b, 0, 5, False)]
    assert [x.plan().ahead for x in ahead.chunks] == [True, False]
    assert ahead.chunks[1].plan().tokens == b.token_ids      # prompt tokens are known on the host
    assert list(s.waiting) == [c]                            # the sequence limit holds c back
    apply(s, out)
    apply(s, ahead)
    assert (a.num_computed, b.num_computed) == (4, 5)
    check_pages(s)


def test_schedule_ahead_admits_within_the_token_budget_left_by_the_decodes():
    s = make(budget=8)
    a = seq(3, "a")
    add(s, a)
    out = s.schedule()
    b = seq(10, "b", 100)
    add(s, b)
    ahead = s.schedule_ahead(out.chunks)
    assert [(x.seq, x.start, x.length) for x in ahead.chunks] == [(a, 3, 1), (b, 0, 7)]   # 8 - 1 decode


def test_schedule_ahead_is_none_while_a_running_sequence_is_mid_prefill():
    s = make(budget=8)
    add(s, seq(3, "a"), seq(10, "b", 100))
    out, ahead = ahead_step(s)
    assert out.rows == [("a", 0, 3, True), ("b", 0, 5, False)]
    assert ahead is None


def test_schedule_ahead_is_none_unless_the_sampled_chunks_are_the_running_set():
    s = make()
    a, b = seq(3, "a"), seq(3, "b", 100)
    add(s, a, b)
    out = s.schedule()
    assert s.schedule_ahead([]) is None
    assert s.schedule_ahead(out.chunks[:1]) is None
    assert s.schedule_ahead(out.chunks[:1] * 2) is None         # right count, wrong sequences
    assert a.block_table == [0] and b.block_table == [1]        # nothing grown on the way
    assert s.schedule_ahead(out.chunks) is not None


def test_schedule_ahead_never_preempts():
    s = make(num_pages=3)
    a, b = seq(3, "a"), seq(4, "b", 100)
    add(s, a, b)
    out = s.schedule()                                         # a: page 0 (room), b: page 1 (full)
    s.bm.grow(seq(4, "x", 900), 4)                             # someone else holds the last page
    assert s.schedule_ahead(out.chunks) is None                # b's next position needs a page
    assert s.running == [a, b] and not s.waiting
    assert a.num_preemptions == b.num_preemptions == 0
    assert len(a.block_table) == 1 and len(b.block_table) == 1


def test_schedule_ahead_keeps_pages_taken_before_a_failure():
    s = make(num_pages=3)
    a, b = seq(4, "a"), seq(4, "b", 100)
    add(s, a, b)
    out = s.schedule()                                         # both full: each needs a page next
    assert s.schedule_ahead(out.chunks) is None                # one free page: a gets it, b does not
    assert len(a.block_table) == 2 and len(b.block_table) == 1
    apply(s, out)
    out = s.schedule()                                         # the normal step preempts instead
    assert out.preempted == [b] and shape(out) == [("a", 4, 1, True)]


# ---------------------------------------------------------------- finish and abort
def test_abort_mid_prefill_frees_the_pages_at_once():
    s = make(num_pages=8, budget=8)
    a, b = seq(30, "a"), seq(5, "b", 100)
    add(s, a, b)
    step(s)
    assert a.num_computed == 8 and len(a.block_table) == 2
    step(s)
    assert len(a.block_table) == 4 and a.num_computed == 16
    s.finish(a, "abort")
    assert a.status == SequenceStatus.FINISHED and a.is_finished and a.finish_reason == "abort"
    assert a.block_table == [] and s.running == [] and list(s.waiting) == [b]
    assert s.bm.num_free_pages == s.bm.num_pages
    assert step(s).rows == [("b", 0, 5, True)]
    s.finish(b, "stop")
    assert s.bm.num_free_pages == s.bm.num_pages and s.bm.ref_counts == [0] * 8
    assert not s.has_unfinished()


def test_finish_frees_a_running_sequence_sharing_pages():
    s = make()
    prompt = list(range(9))
    a, b = Sequence("a", prompt, SamplingParams()), Sequence("b", prompt, SamplingParams())
    add(s, a)
    step(s)
    add(s, b)
    step(s)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    s.finish(a, "stop")
    assert [s.bm.ref_counts[p] for p in shared] == [1, 1]
    check_pages(s)
    s.finish(b, "length")
    assert s.bm.num_free_pages == s.bm.num_pages


def test_finish_removes_a_waiting_sequence():
    s = make(max_num_seqs=1)
    a, b, c = seq(3, "a"), seq(3, "b", 100), seq(3, "c", 200)
    add(s, a, b, c)
    step(s)
    s.finish(b, "abort")
    assert list(s.waiting) == [c] and b.is_finished and b.finish_reason == "abort"
    s.finish(a, "stop")
    assert step(s).rows == [("c", 0, 3, True)]


def test_finish_removes_a_preempted_sequence():
    s = make(num_pages=4, max_num_seqs=3)
    a, b, c = seq(4, "a"), seq(4, "b", 100), seq(4, "c", 200)
    add(s, a, b, c)
    step(s)
    step(s)                                                    # c preempted
    s.finish(c, "abort")
    assert not s.waiting and c.is_finished
    check_pages(s)
    s.finish(a, "stop")
    s.finish(b, "stop")
    assert s.bm.num_free_pages == s.bm.num_pages and not s.has_unfinished()


@pytest.mark.parametrize("caching", [True, False])
def test_pages_all_return_after_a_busy_run(caching):
    """Twenty requests with shared prefixes through 8 pages: chunked prefill, preemptions and aborts
    mid-prefill. The page counts stay consistent every step, every request ends, and every page is
    free at the end. (Each request fits the cache: prompt <= 19 tokens + <= 9 outputs = 7 pages.)"""
    rng = random.Random(0)
    s = make(num_pages=8, max_num_seqs=4, budget=10, caching=caching)
    prefixes = [list(range(100 * i, 100 * i + 8)) for i in range(3)]
    requests = [Sequence(f"r{i}", rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))],
                         SamplingParams()) for i in range(20)]
    want_out = {q.request_id: rng.randrange(1, 10) for q in requests}
    pending = list(requests)
    preemptions = 0
    for _ in range(500):
        if pending and rng.random() < 0.5:
            s.add(pending.pop())
        if not s.has_unfinished():
            if not pending:
                break
            continue
        out = step(s)
        assert not out.is_empty
        preemptions += len(out.preempted)
        assert out.num_tokens <= 10 and len(s.running) <= 4
        check_pages(s)
        for q in list(s.running):
            if q.num_output_tokens >= want_out[q.request_id]:
                s.finish(q, "length")
            elif q.num_computed < q.num_tokens - 1 and rng.random() < 0.05:
                s.finish(q, "abort")                           # aborted mid-prefill
        check_pages(s)
    assert not pending and not s.has_unfinished()
    assert all(q.is_finished for q in requests)
    assert {q.finish_reason for q in requests} == {"length", "abort"}
    assert all(q.num_output_tokens == want_out[q.request_id] for q in requests if q.finish_reason == "length")
    assert preemptions > 0
    assert any(q.num_cached_tokens > 0 for q in requests) == caching
    assert s.bm.num_free_pages == s.bm.num_pages
    assert s.bm.ref_counts == [0] * s.bm.num_pages


def test_prompts_are_spread_over_steps_while_others_decode():
    s = make(prefill_cap=4)
    a = seq(9, "a")
    add(s, a)
    out = s.schedule()
    assert shape(out) == [("a", 0, 9, True)]          # nobody decodes: the whole prompt at once
    apply(s, out)
    b, c = seq(10, "b", 100), seq(3, "c", 200)
    add(s, b, c)
    rows = []
    for _ in range(4):
        out = s.schedule()
        rows.append(shape(out))
        apply(s, out)
    assert rows == [[("a", 9, 1, True), ("b", 0, 4, False)],
                    [("a", 10, 1, True), ("b", 4, 4, False)],
                    [("a", 11, 1, True), ("b", 8, 2, True), ("c", 0, 2, False)],
                    [("a", 12, 1, True), ("b", 10, 1, True), ("c", 2, 1, True)]]
    check_pages(s)


def test_schedule_ahead_carries_the_prompts_under_way():
    s = make(prefill_cap=4)
    a = seq(3, "a")
    add(s, a)
    out = s.schedule()
    apply(s, out)
    b = seq(10, "b", 100)
    add(s, b)
    out = s.schedule()
    assert shape(out) == [("a", 3, 1, True), ("b", 0, 4, False)]
    sampled = [c for c in out.chunks if c.samples]
    continuing = [c for c in out.chunks if not c.samples]
    assert s.schedule_ahead(sampled) is None                 # b is running and not in the plan
    ahead = s.schedule_ahead(sampled, continuing)
    assert [(x.seq, x.start, x.length, x.ahead) for x in ahead.chunks] == [(a, 4, 1, True), (b, 4, 4, False)]
    apply(s, out)
    apply(s, ahead)
    assert (a.num_computed, b.num_computed) == (5, 8)
    check_pages(s)
