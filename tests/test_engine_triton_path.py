"""The engine with its Triton kernels (interpreter on CPU) gives the reference kernels' tokens,
through chunked prefill with cached context and batched paged decode."""
from engine_fixtures import tiny_model  # noqa: F401
from stepvox import LLM, SamplingParams
from stepvox.kernels import use_backend


def test_triton_kernels_in_the_engine_match_reference_kernels(tiny_model):
    prompts = ["Hello world, how are you", [1, 4, 300, 65600, 66000, 70000, 3, 9, 12, 40, 41, 42, 43, 44, 45]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    opts = dict(device="cpu", max_model_len=128, page_size=4, max_num_batched_tokens=9)
    with use_backend("reference"):
        want = [o.outputs[0].token_ids for o in LLM(tiny_model, **opts).generate(prompts, params)]
    with use_backend("triton"):
        llm = LLM(tiny_model, **opts)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert llm.engine.stats["steps"] >= 7          # chunks of <= 9 tokens, then decodes
