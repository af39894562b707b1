"""The audio ops of `stepvox bench kernels` (kernels/bench_cases_audio.py): each case, at its small
shape on the CPU under the Triton interpreter, matches its reference within the case's tolerance,
counts some work, and runs."""
from __future__ import annotations

import pytest
import torch

from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.bench_cases_audio import AUDIO_OPS

pytestmark = pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1 (set by conftest)")

# the interpreter computes bf16 tl.dot wrongly: bf16 is checked on the GPU only
CPU_DTYPES = (torch.float32, torch.float16)
CASES = [pytest.param(op, dtype, id=f"{op.name}-{str(dtype).replace('torch.', '')}")
         for op in AUDIO_OPS for dtype in CPU_DTYPES if dtype in op.dtypes]


def test_audio_ops_are_named_once_and_described():
    names = [op.name for op in AUDIO_OPS]
    assert len(names) == len(set(names))
    for op in AUDIO_OPS:
        assert op.family == "audio" and op.dtypes and op.note
        assert set(op.small_shape) == set(op.default_shape)
        assert op.shape(small=True) == op.small_shape


@pytest.mark.parametrize("op,dtype", CASES)
def test_audio_case_matches_reference(op, dtype):
    case = op.make(op.shape(small=True), torch.device("cpu"), dtype, torch.Generator().manual_seed(0))
    got, ref = case.compare()
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=case.atol, rtol=case.rtol), \
        f"{op.name}: max abs difference {(got.double() - ref.double()).abs().max().item():.3g}"
    assert case.flops > 0 and case.bytes > 0
    case.run()
