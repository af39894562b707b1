"""Row-wise argmax of logits (kernels/argmax.py; Triton under the interpreter) against torch.argmax."""
import pytest
import torch

from stepvox.kernels.argmax import CHUNK, argmax_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_rows_first_maximum_across_chunks(dtype):
    """Rows wider than one chunk; ties inside a block, across blocks and across chunks all go to
    the lowest index, as torch.argmax does; NaN is never chosen."""
    gen = torch.Generator().manual_seed(3)
    v = 2 * CHUNK + 777
    x = torch.randn(5, v, generator=gen).to(dtype)
    x[1, [10, CHUNK + 5, 2 * CHUNK + 3]] = 9.0           # tie across chunks: first wins
    x[2, [2 * CHUNK + 700, 2 * CHUNK + 701]] = 9.0       # tie in the last, partial chunk
    x[3, [1500, 1100]] = 9.0                             # tie inside one chunk, across blocks
    x[4, 7] = float("nan")
    x[4, 8] = 9.0
    for _ in range(2):                                   # the counters must be reset by a launch
        got = argmax_rows(x)
        expected = x.float().nan_to_num(nan=float("-inf")).argmax(-1)
        assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert got[1] == 10 and got[2] == 2 * CHUNK + 700 and got[3] == 1100 and got[4] == 8


def test_argmax_rows_backends_agree():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, CHUNK + 100, generator=gen)
    x[0, [5, CHUNK + 50]] = 7.0
    fast = argmax_rows(x, backend="triton")
    ref = argmax_rows(x, backend="reference")
    assert torch.equal(fast, ref) and torch.equal(ref, x.argmax(-1)) and fast[0] == 5
    with pytest.raises(ValueError, match="backend"):
        argmax_rows(x, backend="interpreter")
