"""The LLM kernel ops of `stepvox bench kernels` (kernels/bench_cases_llm.py): each case's Triton
result matches its reference at the small shape under the interpreter, counts its work, and runs;
FP8 variants too; shape parameters are checked by name."""
import pytest
import torch

from stepvox.kernels.bench_cases_llm import LLM_OPS

OPS = {op.name: op for op in LLM_OPS}
FP8_VARIANTS = [("attention_decode", "kv_fp8"), ("write_kv", "kv_fp8"), ("linear_small_m", "fp8"),
                ("linear_small_m_add_", "fp8"), ("rms_linear_small_m", "fp8")]


def check(op, shape, dtype):
    case = op.make(shape, torch.device("cpu"), dtype, torch.Generator().manual_seed(0))
    got, want = case.compare()
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=case.atol, rtol=case.rtol)
    assert case.bytes > 0 and case.flops >= 0
    case.run()
    return case


def test_names_are_unique_and_shapes_agree():
    assert len(OPS) == len(LLM_OPS)
    for op in LLM_OPS:
        assert set(op.small_shape) == set(op.default_shape) and op.family == "llm"


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_each_case_matches_its_reference(name, dtype):
    op = OPS[name]
    case = check(op, op.shape(small=True), dtype)
    if name not in ("write_kv", "argmax_rows", "sample_top_k", "embedding_sumsq"):
        assert case.flops > 0


@pytest.mark.parametrize("name,flag", FP8_VARIANTS)
def test_fp8_variants_match_their_references(name, flag):
    op = OPS[name]
    check(op, op.shape({flag: 1}, small=True), torch.float32)


def test_shape_overrides_are_checked_by_name():
    op = OPS["attention_decode"]
    assert op.shape({"context": 4096})["context"] == 4096
    with pytest.raises(KeyError, match="no shape parameter 'ctx'; it takes batch, context"):
        op.shape({"ctx": 5})
