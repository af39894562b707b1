"""Async scheduling (a decode step launched before the host has read the previous step's tokens,
engine/llm_engine.py) changes no output: greedy and seeded sampling, stop tokens hit while a step
runs ahead, max_tokens, chunked prefill, preemption, aborts; every page comes back."""
from stepvox import LLM, SamplingParams

PROMPTS = [list(range(300 + 7 * i, 300 + 7 * i + 5 + 3 * i)) for i in range(4)]


def _engines(tiny_model, **options):
    on = LLM(tiny_model, device="cpu", max_model_len=256, page_size=4, async_scheduling=True,
             kernel_backend="reference", **options)
    off = LLM(tiny_model, device="cpu", max_model_len=256, page_size=4, async_scheduling=False,
              kernel_backend="reference", **options)
    return on, off


def _run(llm, params):
    outs = llm.generate(PROMPTS, params)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


def test_greedy_with_stops_and_lengths_is_unchanged(tiny_model):
    on, off = _engines(tiny_model, max_num_batched_tokens=9)
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in off.generate(PROMPTS, free)]
    # stop request 0 at its 6th token and request 2 at its 11th, while the others keep decoding;
    # request 1 ends by max_tokens, request 3 by the context of the batch's longest run
    params = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[plain[0][5]], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[plain[2][10]], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    got, want = _run(on, params), _run(off, params)
    assert got == want
    assert want[0][1] == "stop" and want[0][0][-1] == plain[0][5]
    assert want[1][1] == "length" and len(want[1][0]) == 13
    assert on.engine.stats["steps_ahead"] > 20 and off.engine.stats["steps_ahead"] == 0
    assert on.engine.block_manager.num_free_pages == on.engine.block_manager.num_pages
    # the engine goes on serving after the rows it dropped
    again = on.generate([PROMPTS[3]], params[3])[0].outputs[0].token_ids
    assert again == want[3][0]


def test_seeded_sampling_with_processors_is_unchanged(tiny_model):
    on, off = _engines(tiny_model)
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.92, seed=11 + i, max_tokens=25,
                             min_tokens=4, repetition_aware=True) for i in range(len(PROMPTS))]
    got, want = _run(on, params), _run(off, params)
    assert got == want
    assert on.engine.stats["steps_ahead"] > 10


def test_preemption_and_aborts_while_running_ahead(tiny_model):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = LLM(tiny_model, device="cpu", max_model_len=256, page_size=4, async_scheduling=False,
                kernel_backend="reference")
    want = [o.outputs[0].token_ids for o in roomy.generate(PROMPTS, params)]
    tight = LLM(tiny_model, device="cpu", max_model_len=256, page_size=4, num_kv_pages=16,
                kernel_backend="reference")
    assert [o.outputs[0].token_ids for o in tight.generate(PROMPTS, params)] == want
    assert tight.engine.stats["preemptions"] > 0 and tight.engine.stats["steps_ahead"] > 0
    assert tight.engine.block_manager.num_free_pages == 16

    # abort two requests mid-stream (their rows of the step already running ahead are dropped)
    stream = tight.generate_stream(PROMPTS, params)
    seen = {}
    for out in stream:
        seen[out.request_id] = out
        if len(seen) == len(PROMPTS) and all(len(o.outputs[0].token_ids) >= 5 for o in seen.values()):
            break
    ids = list(seen)
    tight.engine.abort_request(ids[0])
    tight.engine.abort_request(ids[2])
    rest = {}
    while tight.engine.has_unfinished_requests():
        for out in tight.engine.step():
            rest[out.request_id] = out
    assert rest[ids[1]].outputs[0].token_ids == want[1] and rest[ids[3]].outputs[0].token_ids == want[3]
    assert ids[0] not in rest and ids[2] not in rest
    stream.close()
    assert tight.engine.block_manager.num_free_pages == 16
