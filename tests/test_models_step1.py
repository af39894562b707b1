"""Step1 (engine/models/step1.py) in the engine: its Triton kernels (interpreter on CPU) give the
reference kernels' tokens through chunked prefill with cached context and batched paged decode, the
fused decode path gives the unfused tokens, and folding the norm weights keeps the function."""
import torch

from stepvox import LLM, SamplingParams
from stepvox.engine.config import Step1Config
from stepvox.engine.models.step1 import Step1ForCausalLM
from stepvox.engine.models.step1_checkpoint import CheckpointReader


def test_triton_kernels_in_the_engine_match_reference_kernels(tiny_model):
    prompts = ["Hello world, how are you", [1, 4, 300, 65600, 66000, 70000, 3, 9, 12, 40, 41, 42, 43, 44, 45]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    opts = dict(device="cpu", max_model_len=128, page_size=4, max_num_batched_tokens=9)
    want = [o.outputs[0].token_ids
            for o in LLM(tiny_model, kernel_backend="reference", **opts).generate(prompts, params)]
    llm = LLM(tiny_model, kernel_backend="triton", **opts)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert llm.engine.stats["steps"] >= 7          # chunks of <= 9 tokens, then decodes


def test_fused_decode_path_gives_the_unfused_tokens(tiny_model):
    """Steps of <= 16 tokens on one device run the fused products (norm in the qkv / gate|up
    epilogue, SiLU in gate|up's, residual add in o_proj's / down's); greedy tokens match the unfused
    Triton path through chunked prefill and batched decode."""
    prompts = ["Hello world, how are you", [1, 4, 300, 65600, 66000, 70000, 3, 9, 12, 40, 41, 42, 43, 44, 45],
               "another prompt"]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    opts = dict(device="cpu", max_model_len=128, page_size=4, max_num_batched_tokens=12, kernel_backend="triton")
    unfused_llm = LLM(tiny_model, fused_decode=False, **opts)
    unfused = [o.outputs[0].token_ids for o in unfused_llm.generate(prompts, params)]
    llm = LLM(tiny_model, fused_decode=True, **opts)
    fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    model = llm.engine.executor.runner.model
    assert model.norm_weights_folded
    assert model.fused_step(torch.zeros(3, dtype=torch.long))
    assert not model.fused_step(torch.zeros(17, dtype=torch.long))
    assert not unfused_llm.engine.executor.runner.model.fused_step(torch.zeros(3, dtype=torch.long))
    assert fused == unfused


def test_folding_norm_weights_keeps_the_logits(tiny_model, reference_kernels):
    cfg = Step1Config.from_folder(tiny_model)
    model = Step1ForCausalLM(cfg, torch.float32, torch.device("cpu"), kernels=reference_kernels)
    with CheckpointReader(tiny_model, cfg) as reader:
        model.load_weights(reader)
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = model.layers[1]
    before = layer.mlp(layer.post_attention_layernorm(x)), layer.self_attn.qkv_proj(layer.input_layernorm(x))
    norm_w = layer.input_layernorm.weight.clone()
    model.fold_norm_weights()
    model.fold_norm_weights()                         # idempotent
    after = layer.mlp(layer.post_attention_layernorm(x)), layer.self_attn.qkv_proj(layer.input_layernorm(x))
    assert not torch.equal(norm_w, torch.ones_like(norm_w))  # the fixture's norms are not trivial
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(norm_w))
    for b, a in zip(before, after):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
