"""Continuous batching with chunked prefill and preemption by recompute. Touches no tensors.

Every step has a token budget. Running sequences come first, in admission order, each asking for
all the tokens it has not computed yet (1 for a decoding sequence, the rest of its prompt for a
prefilling one), cut to what the budget has left. Waiting sequences are admitted after them while
budget, pages and the sequence limit allow, their cached prompt prefix attached first. When a
running sequence needs a page and none is free, the most recently admitted sequence is preempted:
its pages are released and it waits again at the front, to be recomputed (prompt + output so far).

While sequences decode, a step computes at most `max_prefill_while_decoding` prompt tokens: an
arrival's prompt is spread over a few steps, each a little longer than a pure decode step, instead
of one step that stalls every running stream for the whole prompt.
"""
from __future__ import annotations

import dataclasses
from collections import deque

from .kv_cache import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclasses.dataclass
class ChunkPlan:
    """What a model runner needs to compute one chunk: plain data, sent as is to other ranks."""
    tokens: list[int]         # the chunk's token ids
    start: int                # position of tokens[0] (= tokens already in the cache)
    block_table: list[int]    # the sequence's KV pages
    samples: bool             # the step yields the sequence's next token
    seq_id: int = -1          # the sequence's id (stable through preemption): its row of the device tables
    ahead: bool = False       # a decode whose token comes from the device (the previous step's sample)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class ScheduledChunk:
    seq: Sequence
    start: int          # first position computed this step (= tokens already in the cache)
    length: int         # tokens computed this step
    ahead: bool = False  # a decode planned before its input token was known (schedule_ahead)

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's end, so the step yields its next token."""
        return self.ahead or self.start + self.length == self.seq.num_tokens

    def plan(self) -> ChunkPlan:
        # a chunk planned ahead takes its token from the device (the previous step's sample)
        tokens = [0] if self.ahead else self.seq.token_ids[self.start:self.start + self.length]
        return ChunkPlan(tokens, self.start, self.seq.block_table, self.samples, self.seq.seq_id, self.ahead)


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_while_decoding: int | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_while_decoding = max_prefill_while_decoding
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.release(seq)
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _prefill_budget(self, decoding: bool) -> int:
        """Prompt tokens a step may compute (any while nobody decodes)."""
        cap = self.max_prefill_while_decoding
        return self.max_num_batched_tokens if cap is None or not decoding else cap

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        prefill = self._prefill_budget(any(s.num_tokens - s.num_computed == 1 for s in self.running))
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            left = seq.num_tokens - seq.num_computed
            length = min(left, budget) if left == 1 else min(left, budget, prefill)
            if length == 0:                 # a prompt that waits for the next step's prefill budget
                i += 1
                continue
            while not self.bm.grow(seq, seq.num_computed + length):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break                       # seq itself was the last one and got preempted
            chunks.append(ScheduledChunk(seq, seq.num_computed, length))
            budget -= length
            if left > 1:
                prefill -= length
            i += 1
        if preempted:
            return SchedulerOutput(chunks, preempted)
        self._admit(chunks, min(budget, prefill))
        return SchedulerOutput(chunks, preempted)

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        """Admit waiting sequences, in order, while the token budget, free pages and the sequence
        limit allow; each gets its first chunk (after its cached prompt prefix)."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.bm.cached_prefix_pages(seq)
            start = len(cached) * self.bm.page_size
            length = min(seq.num_tokens - start, budget)
            # pages that are free but hold a cached prefix are not available for new data
            reviving = sum(1 for p in cached if self.bm.ref_counts[p] == 0)
            if self.bm.pages_for(start + length) - len(cached) > self.bm.num_free_pages - reviving:
                break
            self.waiting.popleft()
            cached_tokens = self.bm.admit(seq)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached_tokens
            grown = self.bm.grow(seq, start + length)
            assert grown, "page accounting of admission went wrong"
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, start, length))
            budget -= length

    def schedule_ahead(self, sampled: list[ScheduledChunk],
                       continuing: list[ScheduledChunk] = ()) -> SchedulerOutput | None:
        """The step that follows a step whose chunks `sampled` each yield a token, planned before
        those tokens are known (the engine feeds them on the device), and whose chunks `continuing`
        computed part of a prompt. Only when that step is what schedule() would give next: every
        running sequence is in the step, each gets the pages its next chunk needs without preempting
        anybody; the decodes come first, in `sampled` order (the device ids feed them in that order),
        then the next chunks of the prompts under way, then waiting sequences admitted as schedule()
        admits them (their prompt tokens are known), so arrivals do not stop the engine from running
        ahead. Returns None otherwise (pages taken for the sequences before a failure stay with them:
        the next step needs them anyway)."""
        if not sampled or len(sampled) + len(continuing) != len(self.running):
            return None
        if {id(c.seq) for c in (*sampled, *continuing)} != {id(s) for s in self.running}:
            return None
        chunks = []
        for c in sampled:
            start = c.start + c.length
            if not self.bm.grow(c.seq, start + 1):
                return None
            chunks.append(ScheduledChunk(c.seq, start, 1, ahead=True))
        budget = self.max_num_batched_tokens - len(chunks)
        prefill = self._prefill_budget(True)
        for c in continuing:
            start = c.start + c.length
            length = min(c.seq.num_tokens - start, budget, prefill)
            if length == 0:
                continue
            if not self.bm.grow(c.seq, start + length):
                return None
            chunks.append(ScheduledChunk(c.seq, start, length))
            budget -= length
            prefill -= length
        self._admit(chunks, min(budget, prefill))
        return SchedulerOutput(chunks, [])

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and release pages at once (also for aborts)."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
