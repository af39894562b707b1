"""The engine's greedy output equals an independent eager Step1, alone, batched, chunked, cached
and preempted; pages are freed on cancel; bad requests get typed errors."""
import pytest

from reference_step1 import ReferenceStep1
from stepvox import LLM, SamplingParams
from stepvox.engine.errors import InvalidRequestError, PromptTooLongError

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog", [1, 4, 300, 65600, 66000, 70000, 3],
           "你好，世界<audio_12><audio_2000>"]


def _ids(llm, prompt):
    return llm.get_tokenizer().encode(prompt, add_bos=True) if isinstance(prompt, str) else prompt


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_single_file"])
def test_greedy_matches_independent_reference(fixture, request):
    folder = request.getfixturevalue(fixture)
    llm = LLM(folder, device="cpu", max_model_len=512, kernel_backend="reference")
    ref = ReferenceStep1(folder)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        expected = ref.greedy(_ids(llm, prompt), 10)
        assert out.outputs[0].token_ids == expected
        assert out.prompt_token_ids == _ids(llm, prompt)
        assert out.outputs[0].finish_reason == "length"


def test_same_tokens_alone_and_in_chunked_mixed_batch(tiny_model):
    alone = LLM(tiny_model, device="cpu", max_model_len=512, kernel_backend="reference")
    expected = [alone.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    # a 7-token budget cuts every prompt into chunks and mixes them with other requests' decodes
    mixed = LLM(tiny_model, device="cpu", max_model_len=512, max_num_batched_tokens=7, page_size=4,
                kernel_backend="reference")
    params = [SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True) for i in range(len(PROMPTS))]
    outs = mixed.generate(PROMPTS, params)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids[:10] == expected[i]
    assert mixed.engine.stats["steps"] > len(PROMPTS) * 10 // 2


def test_prefix_cache_hit_reuses_pages_and_keeps_output(tiny_model):
    prefix = list(range(1000, 1040))                       # 40 shared tokens = 5 pages of 8
    a, b = prefix + [7, 8, 9], prefix + [11, 12]
    plain = LLM(tiny_model, device="cpu", max_model_len=512, page_size=8, enable_prefix_caching=False,
                kernel_backend="reference")
    want = [o.outputs[0].token_ids for o in plain.generate([a, b], GREEDY)]
    llm = LLM(tiny_model, device="cpu", max_model_len=512, page_size=8, kernel_backend="reference")
    first = llm.generate([a], GREEDY)[0]
    prefill_before = llm.engine.stats["prefill_tokens"]
    second = llm.generate([b], GREEDY)[0]
    assert first.outputs[0].token_ids == want[0]
    assert second.outputs[0].token_ids == want[1]
    assert second.metrics.num_cached_tokens == 40
    assert llm.engine.stats["prefill_tokens"] - prefill_before == len(b) - 40
    assert first.metrics.num_cached_tokens == 0


def test_preemption_under_tiny_page_budget_keeps_outputs(tiny_model):
    prompts = [list(range(100 + 13 * i, 100 + 13 * i + 9 + i)) for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = LLM(tiny_model, device="cpu", max_model_len=512, page_size=4, kernel_backend="reference")
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    tight = LLM(tiny_model, device="cpu", max_model_len=512, page_size=4, num_kv_pages=14,
                kernel_backend="reference")
    outs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert tight.engine.stats["preemptions"] > 0
    assert tight.engine.block_manager.num_free_pages == 14


def test_seeded_sampling_survives_preemption(tiny_model):
    prompts = [list(range(200 + 11 * i, 210 + 11 * i)) for i in range(4)]
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=100 + i, max_tokens=20, ignore_eos=True)
              for i in range(4)]
    roomy = LLM(tiny_model, device="cpu", max_model_len=512, page_size=4, kernel_backend="reference")
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    tight = LLM(tiny_model, device="cpu", max_model_len=512, page_size=4, num_kv_pages=12,
                kernel_backend="reference")
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == want
    assert tight.engine.stats["preemptions"] > 0


def test_cancel_frees_every_page(tiny_model):
    llm = LLM(tiny_model, device="cpu", max_model_len=512, page_size=4, num_kv_pages=64, kernel_backend="reference")
    engine = llm.engine
    ids = [engine.add_request(list(range(300 + i, 330 + i)), SamplingParams(max_tokens=50)) for i in range(3)]
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_free_pages < 64
    finals = [engine.abort_request(r) for r in ids]
    assert all(f.finished and f.outputs[0].finish_reason == "abort" for f in finals)
    assert engine.block_manager.num_free_pages == 64
    assert sum(engine.block_manager.ref_counts) == 0
    assert not engine.has_unfinished_requests()


def test_streaming_deltas_add_up_and_closing_aborts(tiny_model):
    llm = LLM(tiny_model, device="cpu", max_model_len=512, kernel_backend="reference")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    final = llm.generate(["Hello world"], params)[0].outputs[0]
    pieces, texts = [], []
    for out in llm.generate_stream("Hello world", params):
        pieces += out.outputs[0].new_token_ids
        texts.append(out.outputs[0].new_text)
    assert pieces == final.token_ids
    assert "".join(texts) == final.text
    stream = llm.generate_stream(["Hello", "world"], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


def test_detokenize_false_skips_the_text_and_keeps_the_tokens(tiny_model, monkeypatch):
    """SamplingParams(detokenize=False), as vLLM: token ids only, text "" throughout, and the
    tokenizer is never asked to decode that request (a request beside it still gets its text)."""
    llm = LLM(tiny_model, device="cpu", max_model_len=512, kernel_backend="reference")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    quiet = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
    want = llm.generate(["Hello world"], params)[0].outputs[0]
    assert want.text
    decoded = []
    tok = llm.engine.tokenizer
    real = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, *a, **k: decoded.append(list(ids)) or real(ids, *a, **k))
    streamed = list(llm.generate_stream("Hello world", quiet))
    assert decoded == []
    assert [i for o in streamed for i in o.outputs[0].new_token_ids] == want.token_ids
    assert all(o.outputs[0].text == "" and o.outputs[0].new_text == "" for o in streamed)
    assert streamed[-1].finished and streamed[-1].outputs[0].finish_reason == "length"
    loud, silent = llm.generate(["Hello world", "Hello world"], [params, quiet])
    assert loud.outputs[0].text == want.text and silent.outputs[0].text == ""
    assert loud.outputs[0].token_ids == silent.outputs[0].token_ids == want.token_ids


def test_stop_tokens_min_tokens_and_max_tokens(tiny_model):
    llm = LLM(tiny_model, device="cpu", max_model_len=512, kernel_backend="reference")
    free = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    toks = free.outputs[0].token_ids
    stop = toks[3]
    out = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))[0]
    first = toks.index(stop)
    assert out.outputs[0].token_ids == toks[:first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    # min_tokens masks the stop token, so generation continues past where it would stop
    held = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                                        min_tokens=first + 2))[0]
    assert stop not in held.outputs[0].token_ids[:first + 1]
    assert len(held.outputs[0].token_ids) >= first + 2


def test_bad_requests_get_typed_errors(tiny_model):
    llm = LLM(tiny_model, device="cpu", max_model_len=64, page_size=8, num_kv_pages=6, kernel_backend="reference")
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        llm.generate([list(range(10, 80))])
    with pytest.raises(PromptTooLongError, match="KV pages"):
        llm.generate([list(range(10, 60))])                     # 51 tokens > 6 pages of 8
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, 80000]])
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(InvalidRequestError):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequestError, match="audio codes"):
        llm.generate(["<audio_6000>"])
    assert not llm.engine.has_unfinished_requests()


def test_request_that_outgrows_the_cache_fails_cleanly(tiny_model):
    llm = LLM(tiny_model, device="cpu", max_model_len=512, page_size=8, num_kv_pages=4, kernel_backend="reference")
    out = llm.generate([list(range(10, 30))], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "error"
    assert "KV pages" in str(out.error)
    assert len(out.outputs[0].token_ids) >= 1
    assert llm.engine.block_manager.num_free_pages == 4
