"""Block tables kept on the device (engine/device/block_tables.py): rows per sequence, only the
changed entries sent each step, rows freed and reused, and after every step the gathered tables
equal the padded tables built from scratch (pad_tables: zeros beyond a
sequence's pages). Driven by the real scheduler and block manager through growth, preemption,
prefix-cache hits, aborts and finishes."""
import random

import numpy as np
import pytest
import torch

from stepvox.engine.device.block_tables import BlockTableCapacityError, DeviceBlockTables
from stepvox.engine.kv_cache import BlockManager
from stepvox.engine.device.block_tables import pad_tables as _pad_tables
from stepvox.engine.sampling_params import SamplingParams
from stepvox.engine.scheduler import Scheduler
from stepvox.engine.sequence import Sequence

CPU = torch.device("cpu")


def minimal_writes(before: list[int], after: list[int]) -> int:
    """Entries a row must change to go from `before` to `after`: differing pages where both have
    one, plus every position only one of them has (appended pages, or zeros where a longer table was)."""
    common = min(len(before), len(after))
    return sum(a != b for a, b in zip(before[:common], after[:common])) + abs(len(after) - len(before))


class Checked:
    """DeviceBlockTables plus the checks every step must pass: the gathered tables (at the step's
    width and at full width) equal freshly padded ones, the whole device tensor equals the host
    mirror with the zero row still zero, and the writes sent are exactly the entries that changed."""

    def __init__(self, max_num_seqs: int, max_pages: int, device=CPU):
        self.bt = DeviceBlockTables(max_num_seqs, max_pages, device)
        self.held: dict[int, list[int]] = {}      # row -> the table it should hold, stale rows included
        self.steps = 0

    def step(self, entries, **kw):
        expected = 0
        rows_before = {seq_id: self.bt.row_of(seq_id) for seq_id, _ in entries}
        result = self.bt.update(entries, **kw)
        rows = result.rows.tolist()
        for (seq_id, table), row in zip(entries, rows):
            if rows_before[seq_id] is not None:
                assert row == rows_before[seq_id], "a sequence that kept its row moved"
            expected += minimal_writes(self.held.get(row, []), list(table))
            self.held[row] = list(table)
        assert result.num_writes == expected
        assert result.rows.dtype == torch.int32 and result.rows.device.type == self.bt.device.type
        tables = [list(t) for _, t in entries]
        if tables:
            width = max(len(t) for t in tables) or 1
            assert torch.equal(self.bt.gather(result.rows[:len(entries)], width).cpu(),
                               torch.from_numpy(_pad_tables(tables, width)))
            assert torch.equal(self.bt.gather(result.rows[:len(entries)]).cpu(),
                               torch.from_numpy(_pad_tables(tables, self.bt.max_pages_per_seq)))
        assert torch.equal(self.bt.tables.cpu(), torch.from_numpy(self.bt.mirror_array()))
        assert not self.bt.tables[self.bt.pad_row].any()
        self.steps += 1
        return result


# ---------------------------------------------------------------- what a step sends
def test_a_decode_step_inside_the_last_page_sends_nothing_and_a_new_page_sends_one_entry():
    c = Checked(4, 8)
    first = c.step([(7, [3, 4]), (9, [5])])
    assert first.num_writes == 3 and first.copied
    same = c.step([(7, [3, 4]), (9, [5])])
    assert same.num_writes == 0 and not same.copied            # no copy at all ...
    assert same.rows is first.rows                             # ... the previous step's rows serve again
    grown = c.step([(7, [3, 4, 6]), (9, [5])])
    assert grown.num_writes == 1 and grown.copied
    both = c.step([(7, [3, 4, 6, 1]), (9, [5, 2])])
    assert both.num_writes == 2


def test_a_new_batch_order_copies_the_rows_but_writes_no_entry():
    c = Checked(4, 8)
    c.step([(1, [3]), (2, [4])])
    swapped = c.step([(2, [4]), (1, [3])])
    assert swapped.copied and swapped.num_writes == 0
    assert swapped.rows.tolist() == [1, 0]


def test_the_mirror_does_not_alias_a_table_that_grows_in_place():
    c = Checked(2, 8)
    table = [3, 4]
    c.step([(1, table)])
    table.append(5)                                            # the block manager appends to seq.block_table
    assert c.step([(1, table)]).num_writes == 1


def test_a_replaced_table_sends_only_the_entries_that_differ_and_zeros_what_it_lost():
    c = Checked(2, 8)
    c.step([(1, [10, 11, 12, 13, 14])])
    # re-admitted after preemption: the cached prefix [10, 11] comes back, the rest is new and shorter
    again = c.step([(1, [10, 11, 20])])
    assert again.num_writes == 3                               # column 2 rewritten, columns 3 and 4 zeroed
    assert c.bt.tables[again.rows[0], :5].tolist() == [10, 11, 20, 0, 0]


def test_page_zero_and_empty_tables_are_real_entries():
    c = Checked(3, 4)
    c.step([(1, []), (2, [0]), (3, [0, 0, 1])])
    c.step([(1, [0]), (2, []), (3, [1, 0])])


def test_tuples_and_arrays_are_accepted_as_tables():
    c = Checked(2, 4)
    c.step([(1, (3, 4)), (2, np.array([5, 6, 7], dtype=np.int64))])
    assert c.step([(1, (3, 4)), (2, np.array([5, 6, 7]))]).num_writes == 0


# ---------------------------------------------------------------- rows
def test_rows_of_absent_sequences_are_freed_and_reused_lowest_first():
    c = Checked(3, 6)
    c.step([(1, [1, 2, 3]), (2, [4]), (3, [5, 6])])
    assert [c.bt.row_of(s) for s in (1, 2, 3)] == [0, 1, 2]
    c.step([(1, [1, 2, 3]), (3, [5, 6])])                      # 2 finished: its row is free at once
    assert c.bt.row_of(2) is None and c.bt.num_free_rows == 1
    reused = c.step([(1, [1, 2, 3]), (3, [5, 6]), (4, [9, 8, 7, 6])])
    assert c.bt.row_of(4) == 1
    assert reused.num_writes == 4                              # the stale [4] differs in every entry


def test_a_new_owner_of_a_row_sends_only_what_differs_from_the_stale_contents():
    c = Checked(1, 6)
    c.step([(1, [1, 2, 3, 4])])
    taken = c.step([(2, [1, 2])])                              # a prefix-cache hit on the same pages
    assert c.bt.row_of(2) == 0 and taken.num_writes == 2       # only the two stale entries are zeroed


def test_explicit_release_keeps_rows_when_absent_sequences_are_not_dropped():
    c = Checked(2, 4)
    c.step([(1, [1]), (2, [2])], release_absent=False)
    c.step([(1, [1, 3])], release_absent=False)                # 2 skipped (budget): keeps its row
    assert c.bt.row_of(2) == 1
    back = c.step([(1, [1, 3]), (2, [2])], release_absent=False)
    assert back.num_writes == 0
    assert c.bt.release(2) and not c.bt.release(2) and not c.bt.release(99)
    assert c.bt.row_of(2) is None and c.bt.num_free_rows == 1
    c.step([(1, [1, 3]), (5, [6, 7])], release_absent=False)
    assert c.bt.row_of(5) == 1
    c.bt.release_absent([5])
    assert c.bt.row_of(1) is None and c.bt.row_of(5) == 1


def test_pad_to_fills_a_graph_batch_with_the_zero_row():
    c = Checked(4, 4)
    result = c.step([(1, [1, 2]), (2, [3])], pad_to=4)
    assert result.rows.tolist() == [0, 1, 4, 4] and c.bt.pad_row == 4
    assert not c.bt.gather(result.rows)[2:].any()
    again = c.step([(1, [1, 2]), (2, [3])], pad_to=4)
    assert not again.copied                                    # the same padded rows serve again
    assert c.step([(1, [1, 2]), (2, [3])], pad_to=2).copied    # another size: new rows


# ---------------------------------------------------------------- errors
def test_capacity_errors_are_typed_and_change_nothing():
    c = Checked(2, 3)
    c.step([(1, [1, 2])])
    before = c.bt.tables.clone()
    with pytest.raises(BlockTableCapacityError, match=r"4 KV pages, more than the 3"):
        c.bt.update([(1, [1, 2]), (2, [1, 2, 3, 4])])
    with pytest.raises(BlockTableCapacityError, match=r"3 sequences, more than the 2"):
        c.bt.update([(1, [1]), (2, [2]), (3, [3])])
    c.step([(1, [1, 2]), (2, [5])], release_absent=False)
    with pytest.raises(BlockTableCapacityError, match=r"2 of the 2 rows .* are held"):
        c.bt.update([(3, [3])], release_absent=False)
    with pytest.raises(ValueError, match="twice"):
        c.bt.update([(1, [1]), (1, [1])])
    with pytest.raises(ValueError, match="pad_to"):
        c.bt.update([(1, [1]), (2, [2])], pad_to=1)
    assert c.bt.row_of(3) is None and c.bt.num_free_rows == 0
    assert torch.equal(c.bt.tables[:, :2], torch.tensor([[1, 2], [5, 0], [0, 0]], dtype=torch.int32))
    assert torch.equal(before[0], c.bt.tables[0])
    assert c.step([(1, [1, 2]), (2, [5])], release_absent=False).num_writes == 0    # the mirror held still
    assert c.step([(3, [3])]).num_writes == 2                  # absent rows dropped: 3 takes row 0


def test_a_constructor_without_rows_or_columns_is_refused():
    with pytest.raises(ValueError):
        DeviceBlockTables(0, 4, CPU)
    with pytest.raises(ValueError):
        DeviceBlockTables(4, 0, CPU)


def test_steps_larger_than_the_staging_buffers_still_arrive():
    bt = DeviceBlockTables(2, 4, CPU)
    bt._staging.capacity[torch.int32] = 3                      # force the direct-copy path
    result = bt.update([(1, [1, 2, 3, 4]), (2, [5, 6])])
    assert result.num_writes == 6
    assert torch.equal(bt.gather(result.rows), torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]], dtype=torch.int32))


# ---------------------------------------------------------------- the scheduler's real sequences
PS = 4


def run_scheduler(seed: int, steps: int, release_absent: bool, device=CPU):
    """Drive a Scheduler as the engine does (chunked prefill, decodes planned ahead, preemption,
    prefix-cache hits from shared prompt prefixes, aborts, finishes) and check the device tables
    after every step. Returns what happened, so the test can see the cases were exercised."""
    rng = random.Random(seed)
    bm = BlockManager(num_pages=24, page_size=PS, enable_prefix_caching=True)
    max_num_seqs = 6
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=24)
    c = Checked(max_num_seqs, max_pages=64, device=device)
    prefixes = [list(range(100, 100 + 3 * PS)), list(range(200, 200 + 2 * PS))]
    seen = {"preempted": 0, "prefix_hits": 0, "aborted": 0, "finished": 0, "ahead": 0, "new_page": 0}
    ahead, previous_ids = None, set()
    for _ in range(steps):
        if rng.random() < 0.4 and len(sched.waiting) < 4:
            prompt = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
            sched.add(Sequence(f"r{c.steps}", prompt, SamplingParams(max_tokens=rng.randrange(2, 40))))
        out = ahead if ahead is not None else sched.schedule()
        seen["ahead"] += ahead is not None
        seen["preempted"] += len(out.preempted)
        seen["prefix_hits"] += sum(1 for ch in out.chunks if ch.start > 0 and ch.length > 1 and ch.seq.num_computed
                                   == ch.start == ch.seq.num_cached_tokens and ch.seq.num_output_tokens == 0)
        if not release_absent:
            for q in out.preempted:
                c.bt.release(q.seq_id)
        before = {ch.seq.seq_id: len(ch.seq.block_table) for ch in out.chunks}
        result = c.step([(ch.seq.seq_id, ch.seq.block_table) for ch in out.chunks], release_absent=release_absent)
        ids = {ch.seq.seq_id for ch in out.chunks}
        if ids and ids <= previous_ids and all(ch.length == 1 and ch.seq.num_computed == ch.start
                                               for ch in out.chunks):
            # decodes of sequences already in the last step: one entry per sequence entering a new page
            assert result.num_writes == sum(1 for ch in out.chunks if ch.start % PS == 0)
            seen["new_page"] += result.num_writes
        previous_ids = ids
        # the step ran: K/V computed, a token per sampling chunk, full pages keyed
        sampled = [ch for ch in out.chunks if ch.samples]
        for ch in out.chunks:
            ch.seq.num_computed = ch.start + ch.length
            bm.register_computed(ch.seq)
            assert len(ch.seq.block_table) == before[ch.seq.seq_id]
        for ch in sampled:
            ch.seq.token_ids.append(rng.randrange(1000))
        gone = []
        for ch in sampled:
            if ch.seq.num_output_tokens >= ch.seq.params.max_tokens:
                gone.append((ch.seq, "length"))
        candidates = [q for q in sched.running + list(sched.waiting) if q not in [g for g, _ in gone]]
        if candidates and rng.random() < 0.08:
            gone.append((rng.choice(candidates), "abort"))
        for q, reason in gone:
            sched.finish(q, reason)
            seen["aborted" if reason == "abort" else "finished"] += 1
            if not release_absent:
                c.bt.release(q.seq_id)
        ahead = None
        if not gone and sampled and rng.random() < 0.5:
            ahead = sched.schedule_ahead(sampled)
    return seen


@pytest.mark.parametrize("release_absent", [True, False])
def test_tables_follow_the_scheduler_through_preemption_prefix_hits_and_aborts(release_absent):
    seen = {}
    for seed in range(4):
        for key, n in run_scheduler(seed, 300, release_absent).items():
            seen[key] = seen.get(key, 0) + n
    assert all(n > 0 for n in seen.values()), seen             # every case was exercised


@pytest.mark.gpu
def test_tables_follow_the_scheduler_on_cuda():
    seen = run_scheduler(0, 200, True, device=torch.device("cuda"))
    assert seen["preempted"] and seen["prefix_hits"]
