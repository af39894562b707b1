"""Embedding lookup with the rows' sums of squares (kernels/embedding.py), the first op of a fused
decode step, under the Triton interpreter against the table and float64 sums."""
import pytest
import torch

from stepvox.kernels import embedding_sumsq, embedding_sumsq_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,hidden", [(1, 64), (5, 96), (16, 48), (3, 300)])
def test_embedding_rows_and_sums_of_squares(dtype, m, hidden):
    gen = torch.Generator().manual_seed(m * 100 + hidden)
    vocab = 50
    table = torch.randn(vocab, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, vocab, (m,), generator=gen)
    rows, sumsq = embedding_sumsq(ids, table)
    assert rows.dtype == dtype and rows.shape == (m, hidden)
    assert sumsq.dtype == torch.float32 and sumsq.shape == (1, m)
    assert torch.equal(rows, table[ids])
    assert torch.allclose(sumsq[0].double(), table[ids].double().pow(2).sum(1), rtol=1e-5)


def test_embedding_backends_pdl_and_bad_shapes():
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(20, 40, generator=gen)
    ids = torch.tensor([3, 3, 19, 0])
    rows, sumsq = embedding_sumsq(ids, table, backend="triton")
    rows_np, sumsq_np = embedding_sumsq(ids, table, backend="triton", pdl=False)
    assert torch.equal(rows_np, rows) and torch.equal(sumsq_np, sumsq)
    ref_rows, ref_sumsq = embedding_sumsq(ids, table, backend="reference")
    assert torch.equal(ref_rows, rows)
    assert torch.equal(ref_sumsq, embedding_sumsq_reference(ids, table)[1])
    torch.testing.assert_close(ref_sumsq, sumsq, atol=0, rtol=1e-6)
    empty_rows, empty_sumsq = embedding_sumsq(ids[:0], table)
    assert empty_rows.shape == (0, 40) and empty_sumsq.shape == (1, 0)
    with pytest.raises(ValueError):
        embedding_sumsq(ids[None], table)
    with pytest.raises(ValueError, match="backend"):
        embedding_sumsq(ids, table, backend="triton-cpu")
