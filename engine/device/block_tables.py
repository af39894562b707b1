"""Block tables that live on the device and change by the entries that changed.

Every running sequence owns one row of a persistent [max_num_seqs + 1, max_pages_per_seq] int32
device tensor; the last row is never handed out and stays zero, for the padded entries of a batch
(a CUDA graph's unused slots). A host mirror (the table each row holds, as a list) lets each step
find what differs from the step's tables: normally nothing (a decode inside its last page) or one
appended page; after a preemption, a prefix-cache hit or a re-admission the whole row may differ,
and only the entries that do are sent. Entries beyond a sequence's pages are zero, as the attention
kernels expect from padded tables.

The step's changes go over as flat (index, value) pairs together with the step's row indices, in
one staged non-blocking copy (device/staging.py), and land with one scatter; the caller gathers the
step's tables on the device (`gather`, or an index_select inside a CUDA graph). Device work is
issued on the current stream in step order, so a row handed to another sequence is rewritten only
after every earlier step has read it.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import StepvoxError
from .staging import StagedInputs


def pad_tables(tables: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """Page lists as one int32 array [len(tables), width], zeros past each list's pages (what the
    attention kernels read; default width: the longest list)."""
    width = width or max((len(t) for t in tables), default=1) or 1
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return out


class BlockTableCapacityError(StepvoxError, RuntimeError):
    """A step has more sequences than the device tables have rows, or a sequence more pages than a
    row holds (the message names which, and the limit)."""


@dataclasses.dataclass(frozen=True)
class BlockTableStep:
    """One step's result: `rows` [n, or pad_to] int32 on the device, the row of each given sequence
    in the order given (then the zero row as padding); `num_writes` table entries were sent to the
    device; `copied` says whether the step needed a host-to-device copy at all. `rows` is a view of
    the staging's device buffer: valid until the next update (which may overwrite it in stream
    order), so copy it (into a graph's static input) rather than keep it."""
    rows: torch.Tensor
    num_writes: int
    copied: bool


class DeviceBlockTables:
    def __init__(self, max_num_seqs: int, max_pages_per_seq: int, device: torch.device):
        if max_num_seqs < 1 or max_pages_per_seq < 1:
            raise ValueError(f"DeviceBlockTables needs at least one row and one column, got "
                             f"{max_num_seqs} x {max_pages_per_seq}")
        self.max_num_seqs = max_num_seqs
        self.max_pages_per_seq = max_pages_per_seq
        self.device = torch.device(device)
        self.pad_row = max_num_seqs                         # never assigned: always zero
        self.tables = torch.zeros(max_num_seqs + 1, max_pages_per_seq, dtype=torch.int32, device=self.device)
        self._flat = self.tables.view(-1)
        self._mirror: list[list[int]] = [[] for _ in range(max_num_seqs)]   # what each device row holds
        self._row_of: dict[int, int] = {}
        self._free_rows = list(range(max_num_seqs))          # a heap: the lowest free row first
        # its own turns: the runner's StagedInputs flips once per step, and a second put per step
        # there would refill a host set whose copy may still be queued
        self._staging = StagedInputs({torch.int32: self.staging_capacity(max_num_seqs, max_pages_per_seq)},
                                     self.device)
        self._last_rows: tuple[tuple[int, ...], torch.Tensor] | None = None

    @staticmethod
    def staging_capacity(max_num_seqs: int, max_pages_per_seq: int) -> int:
        """int32 elements of the worst step: every row rewritten whole (index and value per entry),
        plus the row indices."""
        return 2 * max_num_seqs * max_pages_per_seq + max_num_seqs

    @classmethod
    def buffer_bytes(cls, max_num_seqs: int, max_pages_per_seq: int) -> int:
        """Bytes allocated up front: the device tables and the staging's three sets (two pinned host
        sets used by turns, one device set)."""
        return ((max_num_seqs + 1) * max_pages_per_seq + 3 * cls.staging_capacity(max_num_seqs, max_pages_per_seq)) * 4

    # ---------------------------------------------------------------- rows
    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def row_of(self, seq_id: int) -> int | None:
        return self._row_of.get(seq_id)

    def release(self, seq_id: int) -> bool:
        """Free the sequence's row (finished, aborted, preempted); False if it held none. The row's
        contents stay: the next owner's first step sends only the entries that differ."""
        row = self._row_of.pop(seq_id, None)
        if row is None:
            return False
        heapq.heappush(self._free_rows, row)
        return True

    def release_absent(self, seq_ids: Iterable[int]) -> None:
        """Free the rows of every sequence not in `seq_ids`."""
        keep = set(seq_ids)
        for seq_id in [s for s in self._row_of if s not in keep]:
            self.release(seq_id)

    # ---------------------------------------------------------------- steps
    def update(self, entries: Sequence[tuple[int, Sequence[int]]], *, release_absent: bool = True,
               pad_to: int | None = None) -> BlockTableStep:
        """Bring the device rows of the step's sequences, (seq_id, block_table) pairs, up to date and
        return their rows. With `release_absent` the rows of sequences missing from the step are
        freed first (a runner sees only plans: a sequence that left the batch has finished, been
        aborted or preempted; one skipped for budget gets a row again when it returns, and only the
        entries that differ from that row's old contents are sent).
        `pad_to` pads the rows with the zero row to a CUDA graph's batch size. Call once per step:
        the staging's host buffers are reused every other copy (device/staging.py)."""
        ids = [seq_id for seq_id, _ in entries]
        self._check(entries, ids, release_absent, pad_to)
        if release_absent:
            self.release_absent(ids)
        rows: list[int] = []
        index: list[int] = []
        values: list[int] = []
        for seq_id, table in entries:
            row = self._row_of.get(seq_id)
            if row is None:
                row = self._row_of[seq_id] = heapq.heappop(self._free_rows)
            rows.append(row)
            self._diff_row(row, table, index, values)
        if pad_to is not None:
            rows += [self.pad_row] * (pad_to - len(rows))
        return self._send(rows, index, values)

    def gather(self, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """The step's tables [len(rows), width] (default: every column) on the device."""
        tables = self.tables if width is None else self.tables[:, :width]
        return tables.index_select(0, rows)

    def mirror_array(self) -> np.ndarray:
        """The host mirror as the device tensor should read: [max_num_seqs + 1, max_pages_per_seq]."""
        return pad_tables(self._mirror + [[]], self.max_pages_per_seq)      # the zero row last

    # ---------------------------------------------------------------- internals
    def _check(self, entries, ids: list[int], release_absent: bool, pad_to: int | None) -> None:
        """Refuse a step that does not fit before anything changes, so the mirror never runs ahead
        of the device."""
        if len(set(ids)) != len(ids):
            raise ValueError(f"a step lists a sequence twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        for seq_id, table in entries:
            if len(table) > self.max_pages_per_seq:
                raise BlockTableCapacityError(
                    f"sequence {seq_id} holds {len(table)} KV pages, more than the {self.max_pages_per_seq} "
                    f"a device block-table row holds (max_model_len / page_size)")
        if len(ids) > self.max_num_seqs:
            raise BlockTableCapacityError(f"a step of {len(ids)} sequences, more than the {self.max_num_seqs} "
                                          f"device block-table rows (max_num_seqs)")
        new = sum(1 for i in ids if i not in self._row_of)
        kept = len(set(self._row_of) & set(ids)) if release_absent else len(self._row_of)
        if kept + new > self.max_num_seqs:
            raise BlockTableCapacityError(
                f"{new} new sequences need device block-table rows, but {kept} of the {self.max_num_seqs} "
                f"rows (max_num_seqs) are held; release finished sequences' rows first")
        if pad_to is not None and pad_to < len(ids):
            raise ValueError(f"pad_to={pad_to} is smaller than the step's {len(ids)} sequences")

    def _diff_row(self, row: int, table: Sequence[int], index: list[int], values: list[int]) -> None:
        """Append the (flat index, value) writes that turn the row into `table`, and update the mirror."""
        held = self._mirror[row]
        if not isinstance(table, list):                     # a tuple or array: compare as a list
            table = list(table)
        if len(table) == len(held) and table == held:       # the usual decode step: a C-speed compare
            return
        table = list(table)                                 # the mirror must not alias a list that grows
        base = row * self.max_pages_per_seq
        common = min(len(table), len(held))
        if table[:common] != held[:common]:                 # replaced (preemption, prefix hit, new owner)
            new, old = np.asarray(table[:common]), np.asarray(held[:common])
            changed = np.flatnonzero(new != old)
            index += (changed + base).tolist()
            values += new[changed].tolist()
        if len(table) > common:                             # appended pages
            index += range(base + common, base + len(table))
            values += table[common:]
        elif len(held) > common:                            # a shorter table: zero what it no longer has
            index += range(base + common, base + len(held))
            values += [0] * (len(held) - common)
        self._mirror[row] = table

    def _send(self, rows: list[int], index: list[int], values: list[int]) -> BlockTableStep:
        """One staged copy of rows + writes, one scatter. With no writes and the same rows as the
        step before, the previous device rows serve again and nothing is copied."""
        key = tuple(rows)
        if not index and self._last_rows is not None and self._last_rows[0] == key:
            return BlockTableStep(self._last_rows[1], 0, False)
        parts = [(rows, torch.int32)]
        if index:
            parts += [(index, torch.int32), (values, torch.int32)]
        on_device = self._staging.put(parts)
        if index:
            self._flat.index_put_((on_device[1],), on_device[2])
        self._last_rows = (key, on_device[0])
        return BlockTableStep(on_device[0], len(index), True)
