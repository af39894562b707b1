"""Top-k sampling kernel (kernels/sampling.py) under the interpreter: with given uniforms it must
pick exactly the token of the torch formula; with its own Philox draws, a seed repeats, seeds vary,
draws stay inside the top k, and greedy rows take the first maximum."""
import pytest
import torch

from stepvox.kernels.sampling import MAX_TOP_K, sample_top_k, sample_top_k_reference


def _rows(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 2, g


@pytest.mark.parametrize("vocab,chunk", [(300, 128), (64, 64), (1000, 256)])
def test_matches_the_formula_with_given_uniforms(vocab, chunk):
    logits, g = _rows(6, vocab, vocab)
    logits[3, 10] = logits[3, vocab - 5] = logits[3].max() + 1        # a tie at the top: first id wins
    temps = torch.tensor([0.7, 1.0, 0.0, 0.0, 1.3, 0.5])
    ks = torch.tensor([50, 1, 5, 7, 64, 3], dtype=torch.int32)
    for rep in range(2):
        uniforms = torch.rand(6, vocab, generator=g)
        got = sample_top_k(logits, temps, ks, torch.zeros(6, dtype=torch.long), chunk=chunk, uniforms=uniforms)
        assert torch.equal(got, sample_top_k_reference(logits, temps, ks, uniforms)), rep
    assert got[3].item() == 10


def test_fp16_logits_and_ties_at_the_kth_value_are_kept():
    logits = torch.full((2, 200), -5.0)
    logits[:, [3, 50, 120, 180]] = 2.0                   # four equal values; k = 2 keeps all four
    uniforms = torch.rand(2, 200, generator=torch.Generator().manual_seed(1))
    temps, ks = torch.tensor([1.0, 1.0]), torch.tensor([2, 2], dtype=torch.int32)
    got = sample_top_k(logits.half(), temps, ks, torch.zeros(2, dtype=torch.long), chunk=64, uniforms=uniforms)
    assert torch.equal(got, sample_top_k_reference(logits.half(), temps, ks, uniforms))
    assert set(got.tolist()) <= {3, 50, 120, 180}


def test_philox_draws_repeat_by_seed_and_stay_in_the_top_k():
    logits, _ = _rows(1, 256, 5)
    rows = logits.repeat(16, 1)
    temps, ks = torch.full((16,), 1.0), torch.full((16,), 4, dtype=torch.int32)
    seeds = torch.arange(16) * 7919 + 3
    a = sample_top_k(rows, temps, ks, seeds, chunk=128)
    b = sample_top_k(rows, temps, ks, seeds, chunk=128)
    assert torch.equal(a, b)
    top4 = set(logits[0].topk(4).indices.tolist())
    assert set(a.tolist()) <= top4 and len(set(a.tolist())) > 1      # 16 seeds do not all agree


def test_rejects_bad_arguments():
    logits = torch.randn(2, 100)
    with pytest.raises(ValueError, match="one entry per row"):
        sample_top_k(logits, torch.ones(3), torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        sample_top_k(logits, torch.ones(2), torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.long),
                     chunk=MAX_TOP_K // 2)


def test_backend_argument():
    """The kernel runs on Triton only: backend="reference" is refused (the sampler takes its torch
    path instead), an unknown backend is a ValueError, "triton" is the same launch as "auto"."""
    logits, g = _rows(2, 130, 9)
    temps, ks = torch.tensor([0.8, 0.0]), torch.tensor([5, 3], dtype=torch.int32)
    uniforms = torch.rand(2, 130, generator=g)
    seeds = torch.zeros(2, dtype=torch.long)
    got = sample_top_k(logits, temps, ks, seeds, chunk=64, uniforms=uniforms, backend="triton")
    assert torch.equal(got, sample_top_k(logits, temps, ks, seeds, chunk=64, uniforms=uniforms))
    assert torch.equal(got, sample_top_k_reference(logits, temps, ks, uniforms))
    with pytest.raises(RuntimeError, match="Triton only"):
        sample_top_k(logits, temps, ks, seeds, chunk=64, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        sample_top_k(logits, temps, ks, seeds, chunk=64, backend="philox")
