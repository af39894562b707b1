"""Comparing two engines' logits position by position: a logits processor that records each step's
logits, then forces the next token of a given script, so both engines see the same tokens (the
FP8 tests and bench/fp8.py compare FP8 engines with bf16 ones this way)."""
from __future__ import annotations

import torch


class LogitsRecorder:
    def __init__(self, script: list[int]):
        self.script, self.rows = script, []

    def __call__(self, output_ids, row):
        self.rows.append(row.detach().float().cpu().clone())       # the engine writes the row back in place
        forced = torch.full_like(row, float("-inf"))
        forced[self.script[min(len(output_ids), len(self.script) - 1)]] = 0.0
        return forced
