"""Each engine step's wall time by kind, in fixed buckets: what a running stream waits between two
tokens, and what an arrival's prefill adds to it. The engine thread writes; a scrape reads plain
numbers (the server exports them as the histogram `stepvox_engine_step_seconds{kind}`)."""
from __future__ import annotations

import bisect

# a decode step of the 3B model is a few ms on a GPU; CPU steps and long prefills reach seconds
STEP_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
KINDS = ("decode", "mixed", "prefill")      # decodes only; decodes and prompt chunks; prompt chunks only


def step_kind(lengths) -> str:
    """A step's kind from its chunks' lengths (1: a decode, or a prompt's last token)."""
    decodes = any(n == 1 for n in lengths)
    prompts = any(n > 1 for n in lengths)
    return "mixed" if decodes and prompts else "decode" if decodes else "prefill"


class StepTimes:
    def __init__(self, buckets: tuple[float, ...] = STEP_BUCKETS):
        self.buckets = buckets
        self.counts = {kind: [0] * (len(buckets) + 1) for kind in KINDS}   # the last: above every bucket
        self.sums = dict.fromkeys(KINDS, 0.0)

    def observe(self, kind: str, seconds: float) -> None:
        self.counts[kind][bisect.bisect_left(self.buckets, seconds)] += 1
        self.sums[kind] += seconds

    def cumulative(self, kind: str) -> list[tuple[str, int]]:
        """(upper bound, steps at or below it) per bucket, then ("+Inf", all): Prometheus' form."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts[kind]):
            total += n
            out.append((bound, total))
        return out

    def total(self) -> int:
        return sum(sum(c) for c in self.counts.values())
