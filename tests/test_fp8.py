"""FP8 weights (W8A16, one scale per output channel): the quantize-dequantize bound, loading (a bf16
folder quantized while loading and the `stepvox quantize` folder hold the same tensors), the FP8
model computing exactly what its dequantized weights compute, tensor-parallel slices, and the
folder checks; the FP8 KV cache in the engine (its calibrated scales, its error, the Triton path
with prefix-cached pages). On the CPU with the reference product or the Triton interpreter."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepvox import LLM
from stepvox import cli
from stepvox.engine.config import Step1Config
from stepvox.engine.distributed.parallel_state import TPGroup
from stepvox.engine.errors import CheckpointError, ConfigError
from stepvox.engine.kv_cache import kv_page_bytes
from stepvox.engine.layers.embedding import ParallelLMHead
from stepvox.kernels.fp8 import (E4M3_MAX, E4M3_RELATIVE_ERROR, E4M3_SUBNORMAL_ERROR, FP8_DTYPE,
                                       dequantize_rows, quantize_rows)
from stepvox.engine.layers.linear import ColumnParallelLinear, Matmul, RowParallelLinear
from stepvox.engine.models.step1_quantize import quantize_folder
from stepvox.engine.sampling_params import SamplingParams
from stepvox.kernels import KernelConfig
from stepvox.testing.logits import LogitsRecorder
from stepvox.testing.step1 import write_random_step1

ENGINE = dict(device="cpu", kernel_backend="reference", max_model_len=512, num_kv_pages=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = write_random_step1(str(root / "bf16"), seed=3)
    return src, quantize_folder(src, str(root / "fp8")), quantize_folder(src, str(root / "fp8-head"), lm_head=True)


def runner_model(llm):
    return llm.engine.executor.runner.model


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (FP8 tensors compared as bytes: torch has no FP8 equality)."""
    as_bytes = lambda t: t.view(torch.uint8) if t.dtype == FP8_DTYPE else t     # noqa: E731
    return a.dtype == b.dtype and torch.equal(as_bytes(a), as_bytes(b))


def test_quantize_dequantize_error_is_within_e4m3s_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 512, generator=g) * torch.logspace(-6, 3, 96)[:, None]     # nine decades of row sizes
    w[5] = 0.0                                                                    # a zero row
    w[7, 3] = 1e4                                                                 # an outlier sets its row's scale
    q, s = quantize_rows(w.to(torch.bfloat16))
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (96,)
    ref = w.to(torch.bfloat16).double()
    back = dequantize_rows(q, s).double()
    bound = torch.maximum(E4M3_RELATIVE_ERROR * ref.abs(), E4M3_SUBNORMAL_ERROR * s.double()[:, None])
    assert bool(((back - ref).abs() <= bound * (1 + 1e-6)).all())
    assert torch.equal(back[5], torch.zeros(512, dtype=torch.float64)) and s[5] == 1.0
    assert torch.allclose(q.float().abs().amax(dim=1)[s != 1.0], torch.full_like(s[s != 1.0], E4M3_MAX))


def test_a_quantized_folder_reloads_the_tensors_quantized_while_loading(folders):
    src, fp8, _ = folders
    a, b = LLM(src, quantization="fp8", **ENGINE), LLM(fp8, **ENGINE)
    try:
        pa, pb = dict(runner_model(a).named_parameters()), dict(runner_model(b).named_parameters())
        assert pa.keys() == pb.keys()
        for name in pa:
            assert same(pa[name], pb[name]), name
        model = runner_model(b)
        assert model.layers[0].mlp.down_proj.weight.dtype == FP8_DTYPE
        assert model.embed_tokens.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
        assert model.layers[0].input_layernorm.weight.dtype == torch.float32
        assert not model.norm_weights_folded                  # FP8 rows keep their scales: norms applied in kernels
        out_a = a.generate(["hello world"], GREEDY)[0].outputs[0].token_ids
        assert out_a == b.generate(["hello world"], GREEDY)[0].outputs[0].token_ids
    finally:
        a.shutdown()
        b.shutdown()


def test_the_fp8_model_computes_what_its_dequantized_weights_compute(folders, tmp_path):
    """The FP8 folder against a float32 folder holding exactly the dequantized weights: the same
    greedy tokens (the reference product dequantizes, then multiplies in the activations' dtype)."""
    _, fp8, _ = folders
    tensors = load_file(os.path.join(fp8, "model.safetensors"))
    plain = {name: (dequantize_rows(t, tensors[name + "_scale"]) if t.dtype == FP8_DTYPE else t.float())
             for name, t in tensors.items() if not name.endswith("_scale")}
    out = tmp_path / "dequantized"
    out.mkdir()
    save_file(plain, str(out / "model.safetensors"))
    config = json.loads((open(os.path.join(fp8, "config.json")).read()))
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (out / name).write_bytes(open(os.path.join(fp8, name), "rb").read())
    a, b = LLM(fp8, **ENGINE), LLM(str(out), **ENGINE)
    try:
        prompts = ["hello world", "今天天气很好", "a b c d e f"]
        assert [o.outputs[0].token_ids for o in a.generate(prompts, GREEDY)] == \
            [o.outputs[0].token_ids for o in b.generate(prompts, GREEDY)]
    finally:
        a.shutdown()
        b.shutdown()


def test_an_fp8_lm_head_is_selectable(folders):
    src, _, fp8_head = folders
    for llm in (LLM(src, quantization="fp8", quantize_lm_head=True, **ENGINE), LLM(fp8_head, **ENGINE)):
        try:
            head = runner_model(llm).lm_head
            assert head.weight.dtype == FP8_DTYPE and head.weight_scale.shape == (head.local_vocab,)
            assert len(llm.generate(["hi"], GREEDY)[0].outputs[0].token_ids) == GREEDY.max_tokens
        finally:
            llm.shutdown()
    with pytest.raises(ConfigError, match="quantize_lm_head goes with"):
        LLM(src, quantize_lm_head=True, **ENGINE)
    with pytest.raises(ConfigError, match="quantization must be one of 'fp8'"):
        LLM(src, quantization="int4", **ENGINE)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_slices_of_fp8_weights_and_scales_equal_slices_of_the_whole(tp_size):
    g = torch.Generator().manual_seed(1)
    matmul = Matmul(KernelConfig())
    q_w, k_w = torch.randn(64, 32, generator=g).bfloat16(), torch.randn(16, 32, generator=g).bfloat16()
    o_w = (torch.randn(32, 64, generator=g) * torch.rand(1, 64, generator=g) * 5).bfloat16()   # columns differ
    head_w = torch.randn(40, 32, generator=g).bfloat16()
    (qq, qs), (kq, ks), (oq, os_), (hq, hs) = (quantize_rows(t) for t in (q_w, k_w, o_w, head_w))
    for rank in range(tp_size):
        tp = TPGroup(rank, tp_size)
        for stored in (False, True):                     # a bf16 tensor quantized here, or an FP8 one as stored
            col = ColumnParallelLinear(32, [64, 16], torch.float32, "cpu", tp, matmul, fp8=True)
            row = RowParallelLinear(64, 32, torch.float32, "cpu", tp, matmul, fp8=True)
            head = ParallelLMHead(40, 32, torch.float32, "cpu", tp, matmul, fp8=True)
            if stored:
                col.load_shard(qq, 0, scale=qs)
                col.load_shard(kq, 1, scale=ks)
                row.load_shard(oq, 0, scale=os_)
                head.load_shard(hq, 0, scale=hs)
            else:
                col.load_shard(q_w, 0)
                col.load_shard(k_w, 1)
                row.load_shard(o_w, 0)
                head.load_shard(head_w, 0)
            n, m, c, v = 64 // tp_size, 16 // tp_size, 64 // tp_size, 40 // tp_size
            want_w = torch.cat([qq[rank * n:(rank + 1) * n], kq[rank * m:(rank + 1) * m]])
            want_s = torch.cat([qs[rank * n:(rank + 1) * n], ks[rank * m:(rank + 1) * m]])
            assert same(col.weight, want_w) and same(col.weight_scale, want_s)
            assert same(row.weight, oq[:, rank * c:(rank + 1) * c].contiguous())
            assert same(row.weight_scale, os_)                        # whole-row scales on every rank
            assert same(head.weight, hq[rank * v:(rank + 1) * v]) and same(head.weight_scale, hs[rank * v:(rank + 1) * v])


def test_fp8_checkpoints_are_checked(folders, tmp_path):
    src, fp8, _ = folders
    bf16 = ColumnParallelLinear(32, [8], torch.float32, "cpu", TPGroup(), Matmul(KernelConfig()))
    q, s = quantize_rows(torch.randn(8, 32))
    with pytest.raises(CheckpointError, match="an FP8 checkpoint loads into an FP8 model only"):
        bf16.load_shard(q, 0, scale=s)
    with pytest.raises(CheckpointError, match="without its scales"):
        ColumnParallelLinear(32, [8], torch.float32, "cpu", TPGroup(), Matmul(KernelConfig()), fp8=True).load_shard(q)
    # a config.json that says FP8 over bf16 tensors: the scales are missing
    fake = tmp_path / "fake"
    fake.mkdir()
    for name in os.listdir(src):
        (fake / name).write_bytes(open(os.path.join(src, name), "rb").read())
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = json.loads(open(os.path.join(fp8, "config.json")).read())["quantization_config"]
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing.*q_proj\.weight_scale"):
        LLM(str(fake), **ENGINE)
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported quantization_config"):
        Step1Config.from_folder(str(fake))
    # FP8 names with the wrong dtypes: scales stored as bf16
    tensors = load_file(os.path.join(fp8, "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight_scale"
    tensors[name] = tensors[name].bfloat16()
    broken = tmp_path / "broken"
    broken.mkdir()
    for entry in os.listdir(fp8):
        if entry != "model.safetensors":
            (broken / entry).write_bytes(open(os.path.join(fp8, entry), "rb").read())
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is BF16, not F32"):
        LLM(str(broken), **ENGINE)


def test_stepvox_quantize_writes_a_folder_that_generates(folders, tmp_path, capsys):
    src, _, _ = folders
    dst = tmp_path / "q"
    assert cli.main(["quantize", src, str(dst), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {dst}: FP8 linear weights of 2 layers") and "GB of safetensors" in out
    assert Step1Config.from_folder(str(dst)).quantization == "fp8"
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert cli.main(["generate", "--model", str(dst), "--device", "cpu", "--kernels", "reference",
                     "--max-tokens", "4", "--max-model-len", "256", "--kv-cache-dtype", "fp8"]) == 0
    assert cli.main(["quantize", src, str(dst), "--device", "cpu"]) == 2        # exists: refused, nothing touched
    assert capsys.readouterr().err.endswith(f"stepvox: error: {dst} exists: give a new folder\n")
    assert cli.main(["quantize", str(dst), str(tmp_path / "again"), "--device", "cpu"]) == 2
    assert "is already quantized (fp8)" in capsys.readouterr().err


def test_the_plans_fp8_weight_bytes_are_what_stepvox_quantize_writes(folders):
    from stepvox.plan import rank_weight_bytes
    src, fp8, _ = folders
    written = sum(t.numel() * t.element_size() for t in load_file(os.path.join(fp8, "model.safetensors")).values())
    cfg = Step1Config.from_folder(src)
    assert rank_weight_bytes(cfg, 1, "fp8") == written
    bf16 = [load_file(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors")]
    assert rank_weight_bytes(cfg, 1) == sum(t.numel() * 2 for shard in bf16 for t in shard.values())


def test_the_fused_fp8_decode_step_gives_the_unfused_tokens(folders):
    """Triton kernels under the interpreter: the fused step reads FP8 weights and applies the
    (unfolded) norm weights itself; greedy tokens equal the unfused FP8 path's."""
    _, fp8, _ = folders
    opts = dict(device="cpu", max_model_len=128, page_size=4, max_num_batched_tokens=12, kernel_backend="triton")
    prompts = ["Hello world, how are you", "another prompt"]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    got = {}
    for fused in (False, True):
        llm = LLM(fp8, fused_decode=fused, **opts)
        try:
            assert runner_model(llm).fused_step(torch.zeros(3, dtype=torch.long)) == fused
            got[fused] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
    assert got[True] == got[False]


def test_dummy_weights_need_only_the_config_and_tokenizer(folders, tmp_path):
    """load_format="dummy": random weights of the config's shapes (the 130B bench path, whose
    checkpoint fits no disk), the same for every engine of the folder, bf16 or quantized to FP8."""
    src, _, _ = folders
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (bare / name).write_bytes(open(os.path.join(src, name), "rb").read())
    with pytest.raises(CheckpointError, match="has neither"):
        LLM(str(bare), **ENGINE)
    runs = []
    for opts in ({}, {}, {"quantization": "fp8"}):
        llm = LLM(str(bare), load_format="dummy", **ENGINE, **opts)
        try:
            model = runner_model(llm)
            runs.append([o.outputs[0].token_ids for o in llm.generate(["hello", "world"], GREEDY)])
            assert torch.isfinite(model.layers[1].mlp.down_proj.weight.float()).all()
            assert torch.equal(model.layers[0].input_layernorm.weight, torch.ones_like(model.layers[0].input_layernorm.weight))
            if opts:
                assert model.layers[0].self_attn.qkv_proj.weight.dtype == FP8_DTYPE
        finally:
            llm.shutdown()
    assert runs[0] == runs[1]                                # a tensor's values come from its name
    with pytest.raises(ConfigError, match="load_format must be one of"):
        LLM(str(bare), load_format="pt", **ENGINE)


def test_an_fp8_kv_cache_is_calibrated_at_load_and_stays_close_to_the_full_cache(folders):
    """kv_cache_dtype="fp8": one-byte pages, per-(layer, KV head) scales from the calibration
    prefill (the same on every load), and logits along the full cache's greedy tokens within e4m3's
    2^-4 relative bound (each cached element is within it; the logits average many)."""
    src, _, _ = folders
    prompts = ["hello world, this is a longer prompt for the cache", "今天天气很好"]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    full = LLM(src, **ENGINE)
    try:
        scripts = [o.outputs[0].token_ids for o in full.generate(prompts, params)]
        want = []
        for prompt, script in zip(prompts, scripts):
            rec = LogitsRecorder(script)
            full.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                   logits_processors=[rec]))
            want.append(torch.stack(rec.rows))
    finally:
        full.shutdown()
    scales = []
    for _ in range(2):
        llm = LLM(src, kv_cache_dtype="fp8", **ENGINE)
        try:
            runner = llm.engine.executor.runner
            assert runner.kv_cache[0][0].dtype == FP8_DTYPE
            scales.append(runner.kv_scales.clone())
            errors = []
            for prompt, script, ref in zip(prompts, scripts, want):
                rec = LogitsRecorder(script)
                llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                      logits_processors=[rec]))
                got = torch.stack(rec.rows)
                errors.append((got - ref).norm(dim=1) / ref.norm(dim=1))
        finally:
            llm.shutdown()
    cfg = runner.cfg
    assert scales[0].shape == (cfg.num_hidden_layers, 2, cfg.num_attention_groups)
    assert torch.equal(scales[0], scales[1]) and bool((scales[0] > 0).all())
    assert len(set(scales[0].flatten().tolist())) == scales[0].numel()         # each head its own
    errors = torch.cat(errors)
    assert 0 < float(errors.max()) < 2.0 ** -4
    assert kv_page_bytes(2, 2, 16, 64, FP8_DTYPE) * 2 == kv_page_bytes(2, 2, 16, 64, torch.bfloat16)
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of"):
        LLM(src, kv_cache_dtype="int8", **ENGINE)


def test_the_triton_fp8_kv_path_gives_the_reference_tokens(folders):
    """Kernels under the interpreter (the fused decode step writing quantized K/V, prefill reading
    prefix-cached FP8 pages as context) against the reference kernels on the same FP8 cache: both
    round to the same e4m3 values, so the greedy tokens agree."""
    src, _, _ = folders
    opts = dict(device="cpu", max_model_len=128, page_size=4, max_num_batched_tokens=16, kv_cache_dtype="fp8")
    prompts = ["Hello world, how are you today", "Hello world, how are you doing"]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    got = {}
    for backend in ("reference", "triton"):
        llm = LLM(src, kernel_backend=backend, **opts)
        try:
            first = llm.generate(prompts[:1], params)[0].outputs[0].token_ids
            second = llm.generate(prompts[1:], params)[0]          # its prefix pages come from the cache
            assert second.metrics.num_cached_tokens >= 4
            got[backend] = [first, second.outputs[0].token_ids]
        finally:
            llm.shutdown()
    assert got["triton"] == got["reference"]
