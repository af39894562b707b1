"""Graph buckets (engine/device/graphs.py): the length and batch buckets that let a few CUDA
graphs serve all input sizes."""
from __future__ import annotations

import pytest

from stepvox.engine.device.graphs import bucket_batch, bucket_length


# ---------------------------------------------------------------- the audio tokenizer's buckets
# (ported from test_audio_tokenizer.py: multiples of the unit up to 5 units, then ~x1.25)
def test_bucket_rounding():
    seq = [bucket_length(n, 100, 3000, geometric_after=5) for n in range(1, 3001)]
    assert seq[0] == 100 and seq[-1] == 3000 and all(a <= b for a, b in zip(seq, seq[1:]))
    assert all(b >= n for n, b in enumerate(seq, 1))
    assert all(b % 100 == 0 for b in seq) and len(set(seq)) <= 13              # few graphs for 0-30 s
    assert all(b < 1.25 * n + 100 for n, b in enumerate(seq, 1))                # bounded padding
    assert bucket_length(2999, 100, 3000, geometric_after=5) == 3000
    assert bucket_length(3000, 100, 3000, geometric_after=5) == 3000
    with pytest.raises(ValueError):
        bucket_length(3001, 100, 3000, geometric_after=5)
    assert bucket_length(42, 4, geometric_after=5) == 48 and bucket_length(1, 4, geometric_after=5) == 4
    assert bucket_length(42, 4) == 44                                            # without it: plain multiples
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]


# ---------------------------------------------------------------- plain multiples and the geometric rule
# (ported from test_flow_kernels.py: the flow solver's buckets, plain multiples of the unit)
def _geometric_buckets(unit, after, top):
    """The rule written out: whole units up to `after` units, then each bucket the smallest multiple
    of the unit at or above 1.25 x the one before (at least one unit more)."""
    buckets = [unit * i for i in range(1, after + 1)]
    while buckets[-1] < top:
        nxt = -(-buckets[-1] * 5 // (4 * unit)) * unit
        buckets.append(max(nxt, buckets[-1] + unit))
    return buckets


def test_bucket_length_plain_multiples_geometric_steps_and_cap():
    assert [bucket_length(n, 32) for n in (1, 32, 33, 861)] == [32, 32, 64, 864]
    assert all(bucket_length(n, u) == -(-n // u) * u for u in (1, 4, 32) for n in range(1, 300))
    assert bucket_length(0, 32) == 32
    assert bucket_length(42, 4) == 44 and bucket_length(42, 4, geometric_after=5) == 48
    # whole units up to 5 units, then ~x1.25 rounded up to the unit
    assert sorted({bucket_length(n, 100, geometric_after=5) for n in range(1, 3001)}) == \
        [100, 200, 300, 400, 500, 700, 900, 1200, 1500, 1900, 2400, 3000]
    for unit in (1, 4, 10, 100):
        buckets = _geometric_buckets(unit, 5, 400 * unit)
        for n in range(1, 300 * unit, max(1, unit // 4)):
            assert bucket_length(n, unit, geometric_after=5) == next(b for b in buckets if b >= n), (unit, n)
    assert [bucket_length(n, 10, geometric_after=2) for n in (15, 20, 21, 30, 31)] == [20, 20, 30, 30, 40]
    # the cap is the last bucket, whichever rule; above it n is refused
    assert bucket_length(1901, 100, 2000, geometric_after=5) == 2000          # the 2400 bucket is capped
    assert bucket_length(1900, 100, 2000, geometric_after=5) == 1900
    assert bucket_length(95, 10, cap=95) == 95 and bucket_length(81, 10, cap=95) == 90
    for kw in ({}, {"geometric_after": 5}):
        with pytest.raises(ValueError, match="cap"):
            bucket_length(2001, 100, 2000, **kw)
