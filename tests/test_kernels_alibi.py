"""ALiBi slopes (kernels/alibi.py) against the SPEC formula, whole and sliced per tensor-parallel rank."""
import pytest
import torch

from reference_kernels import spec_slopes
from stepvox.kernels import alibi_slopes


def test_slopes_follow_spec_and_slice_per_rank():
    for heads in (48, 96, 12, 7):
        assert torch.allclose(alibi_slopes(heads).double(), torch.tensor(spec_slopes(heads), dtype=torch.float64))
    full = alibi_slopes(96)
    parts = [alibi_slopes(96, tp_rank=r, tp_size=4) for r in range(4)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError):
        alibi_slopes(96, tp_rank=0, tp_size=5)
