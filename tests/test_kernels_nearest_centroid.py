"""Nearest-centroid search of the tokenizers' quantisers (kernels/nearest_centroid.py; Triton under
the interpreter on small shapes) against the reference and float64 brute force: the exhaustive
IEEE kernel and the TF32-screened one, whose TF32 rounding the interpreter emulates. The method is
an argument (`method="screened"|"exhaustive"`), as is the backend."""
from __future__ import annotations

import pytest
import torch

from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.nearest_centroid import (SCREEN_BLOCK_K, SLOTS, nearest_centroid, nearest_centroid_exhaustive,
                                              nearest_centroid_reference, nearest_centroid_screened,
                                              screen_error_bounds)

needs_interpreter = pytest.mark.skipif(not (INTERPRETER_ACTIVE or torch.cuda.is_available()),
                                       reason="Triton needs the interpreter or a GPU")


def test_nearest_centroid_reference_is_euclidean_argmin():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 24, generator=g)
    e = torch.randn(70, 24, generator=g)
    assert nearest_centroid_reference(x, e).tolist() == torch.cdist(x.double(), e.double()).argmin(1).tolist()


@needs_interpreter
@pytest.mark.parametrize("n,k,d", [(37, 130, 48), (5, 64, 64), (64, 17, 100)])
@pytest.mark.parametrize("method", ["screened", "exhaustive"])
def test_nearest_centroid_triton(n, k, d, method):
    g = torch.Generator().manual_seed(n)
    # small integers: every dot product is exact in float32, so ties are real ties
    x = torch.randint(-3, 4, (n, d), generator=g).float()
    e = torch.randint(-3, 4, (k, d), generator=g).float()
    e[k // 2] = e[k // 3]                                  # a duplicated entry: the lower index must win
    x[0] = e[k // 3]
    got = nearest_centroid(x, e, method=method, backend="triton")
    got_half = nearest_centroid(x.half(), e, method=method, backend="triton")   # low-precision features, fp32 search
    ref = nearest_centroid_reference(x, e)
    assert got.dtype == torch.long and got.tolist() == ref.tolist()
    assert int(got[0]) == min(k // 2, k // 3)
    assert got_half.tolist() == nearest_centroid_reference(x.half().float(), e).tolist()


def test_nearest_centroid_rejects_bad_shapes():
    with pytest.raises(ValueError):
        nearest_centroid(torch.zeros(3, 4), torch.zeros(5, 6))


def test_nearest_centroid_rejects_unknown_method_and_backend():
    x, e = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="method"):
        nearest_centroid(x, e, method="bogus")
    with pytest.raises(ValueError, match="method"):
        nearest_centroid(x, e, method="bogus", backend="reference")      # checked before the backend picks
    with pytest.raises(ValueError, match="backend"):
        nearest_centroid(x, e, backend="exhaustive")


@pytest.mark.parametrize("method", ["screened", "exhaustive"])
def test_nearest_centroid_reference_backend(method):
    """backend="reference" is the float32 matmul argmin whichever method is named (the method picks
    between the Triton implementations only)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 24, generator=g)
    e = torch.randn(33, 24, generator=g)
    sq = e.pow(2).sum(-1)
    got = nearest_centroid(x, e, sq, method=method, backend="reference")
    assert got.dtype == torch.long and torch.equal(got, nearest_centroid_reference(x, e, sq))
    assert torch.equal(nearest_centroid(x, e, method=method, backend="reference"), got)   # sqnorm computed


def _tf32(t: torch.Tensor) -> torch.Tensor:
    return (t.float().view(torch.int32) & -8192).view(torch.float32)


def _near_tie_case(n=40, k=300, d=64, gap=1e-4, seed=7):
    """Each row has two codes at distances r and r (1 + gap) (random places in the codebook, so
    in different splits), the rest of the codebook far away: exact float32 scores separate the
    pair clearly (differences ~1e-5 vs ~1e-7 rounding), TF32 scores (~1e-3 error) do not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    e = 3.0 * torch.randn(k, d, generator=g) / d ** 0.5 + 2.0
    places = torch.randperm(k, generator=g)[: 2 * n].view(n, 2)
    for i in range(n):
        u = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1)
        r = 0.5
        scale = 1.0 + gap if i % 2 else 1.0 - gap     # which of the pair wins alternates
        e[places[i, 0]] = x[i] + r * u[0]
        e[places[i, 1]] = x[i] + r * scale * u[1]
    return x, e


@needs_interpreter
def test_screened_search_resolves_near_ties_that_tf32_gets_wrong():
    x, e = _near_tie_case()
    sq = e.pow(2).sum(-1)
    ref = nearest_centroid_reference(x, e, sq)
    exact64 = (sq.double()[None, :] - 2.0 * x.double() @ e.double().T).argmin(1)
    assert ref.tolist() == exact64.tolist()                   # the gaps are far above fp32 rounding
    tf32_scores = sq[None, :].double() - 2.0 * (_tf32(x).double() @ _tf32(e).double().T)
    assert (tf32_scores.argmin(1) != ref).sum() >= 3          # a TF32-only search would get these wrong
    got = nearest_centroid(x, e, sq, backend="triton")                  # method="screened" by default
    assert got.tolist() == ref.tolist()
    assert nearest_centroid(x, e, sq, method="exhaustive", backend="triton").tolist() == ref.tolist()
    assert nearest_centroid_exhaustive(x, e, sq).tolist() == ref.tolist()


def test_screen_bound_covers_tf32_error():
    """The screen's bound is above the TF32 vs float32 score error (emulated operand truncation,
    float64 accumulation) on data of both tokenizers' widths. It is a worst-case bound, so on
    random data it sits 20-30x above the error (which grows like sqrt(D), not D)."""
    g = torch.Generator().manual_seed(3)
    for d, normalise in ((512, False), (1280, True)):
        x = torch.randn(64, d, generator=g)
        e = torch.randn(256, d, generator=g) * 0.7
        if normalise:
            x = torch.nn.functional.normalize(x, dim=-1)
            e = torch.nn.functional.normalize(e, dim=-1)
        rel, abs_ = screen_error_bounds(d)
        err = (2 * (_tf32(x).double() @ _tf32(e).double().T - x.double() @ e.double().T)).abs()
        bound = rel * x.double().norm(dim=1)[:, None] * e.double().norm(dim=1)[None, :] \
            + abs_ * e.double().pow(2).sum(1)[None, :]
        assert bool((err < bound).all())
        assert float((err / bound).max()) > 0.01                 # and not absurdly loose


@needs_interpreter
@pytest.mark.parametrize("slots", [SLOTS, 2])
def test_screened_search_exact_ties_overflow_and_zero_rows(slots):
    """Exact ties (small integers: every score exact) go to the lowest index, also when more tied
    codes share a split than it has candidate slots (the split is then re-scored whole)."""
    g = torch.Generator().manual_seed(11)
    n, k, d = 20, 2 * SCREEN_BLOCK_K + 37, 40
    x = torch.randint(-3, 4, (n, d), generator=g).float()
    e = torch.randint(-3, 4, (k, d), generator=g).float()
    dup = list(range(5, 5 + 3 * SLOTS, 3)) + [SCREEN_BLOCK_K + 9, 2 * SCREEN_BLOCK_K + 30]
    for j in dup:
        e[j] = e[200]                          # 200 and copies before it in split 0 and 1, after in split 2
    x[0] = e[200]
    x[1] = 0.0                                  # zero row: the smallest ||e||^2 wins
    x[2] = e[200] + 0.5                         # a few x exactly between codes
    sq = e.pow(2).sum(-1)
    ref = nearest_centroid_reference(x, e, sq)
    got = nearest_centroid_screened(x, e, sq, slots=slots)
    assert got.tolist() == ref.tolist()
    assert int(got[0]) == 5 and int(got[1]) == int(torch.argmin(sq))
    assert got.tolist() == nearest_centroid_exhaustive(x, e, sq).tolist()


@needs_interpreter
def test_screened_search_random_shapes():
    g = torch.Generator().manual_seed(5)
    for n, k, d in [(1, 1, 16), (3, 129, 33), (70, 300, 100)]:
        x = torch.randn(n, d, generator=g)
        e = torch.randn(k, d, generator=g)
        sq = e.pow(2).sum(-1)
        assert nearest_centroid_screened(x, e, sq).tolist() == nearest_centroid_reference(x, e, sq).tolist()
    assert nearest_centroid_screened(torch.zeros(0, 8), torch.randn(4, 8), torch.ones(4)).shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,d,normalise", [(250, 4096, 1280, True), (167, 1024, 512, False)])
def test_screened_equals_exhaustive_on_gpu(n, k, d, normalise):
    """On real tensor cores (true TF32 rounding), at both tokenizers' sizes, with codebooks drawn
    from the data and engineered near-ties: the same codes as the all-IEEE kernel."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g)
    e = x[torch.randint(0, n, (k,), generator=g)] + 0.3 * torch.randn(k, d, generator=g)
    tx, te = _near_tie_case(n=40, k=300, d=d)
    x[:40] = tx
    e[:300] = te
    if normalise:
        x = torch.nn.functional.normalize(x, dim=-1)
        e = torch.nn.functional.normalize(e, dim=-1)
    x, e = x.cuda(), e.cuda()
    sq = e.pow(2).sum(-1)
    got = nearest_centroid_screened(x, e, sq)
    assert got.tolist() == nearest_centroid_exhaustive(x, e, sq).tolist()
    assert (got.cpu() == nearest_centroid_reference(x.cpu(), e.cpu())).float().mean() > 0.99


