"""The synchronous APIs under bad requests: LLM.generate returns every output, a failed one with
finish_reason "error" and a typed error naming the request and the cause; the others keep their
tokens, every page returns, and rows of a step already running ahead are dropped."""
import torch

from stepvox import LLM, SamplingParams
from stepvox.engine.errors import InvalidRequestError

PROMPTS = [list(range(300 + 11 * i, 306 + 11 * i + i % 3)) for i in range(14)]


def _at(n, make):
    """A processor that returns make(logits) from the n-th generated token on."""
    def processor(output_ids, logits):
        return make(logits) if len(output_ids) >= n else logits
    return processor


def _raise(logits):
    raise KeyError("no such word")


def _set(params, **fields):
    """Values that a caller slipped past SamplingParams (set after construction)."""
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


def _bad_params():
    """(params, what the error says) per kind of failure."""
    def p(processor=None, **kw):
        return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                              logits_processors=[processor] if processor else None, **kw)
    return [
        (p(_at(2, _raise)), "logits processor #0 of request {} raised KeyError"),
        (p(_at(1, lambda x: x[:-1])), "returned shape"),
        (p(_at(3, lambda x: torch.full_like(x, float("nan")))), "returned NaN or +inf"),
        (p(_at(0, lambda x: torch.full_like(x, float("-inf")))), "masked every token"),
        (p(_at(1, lambda x: None)), "returned NoneType, not a tensor"),
        (p(_at(2, lambda x: x.long())), "not floating point"),
        (_set(p(), logits_processors=[lambda logits: logits]), "raised TypeError"),   # wrong arity
        (_set(p(), seed="x"), "reading the sampling parameters of request {}"),
        (_set(SamplingParams(temperature=0.7, max_tokens=8), seed=2 ** 64), "reading the sampling parameters"),
        (_set(p(), max_tokens="x"), "the stop check of request {}"),
    ]


def _good(i):
    if i % 2:
        return SamplingParams(temperature=0.9, top_k=30, seed=7 + i, max_tokens=8, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _mixed():
    bad = _bad_params()
    prompts, params, kinds = [], [], []
    for i, prompt in enumerate(PROMPTS):
        prompts.append(prompt)
        params.append(_good(i))
        kinds.append(None)
        if i < len(bad):
            prompts.append(list(range(900 + 5 * i, 906 + 5 * i)))
            params.append(bad[i][0])
            kinds.append(bad[i][1])
    return prompts, params, kinds


def _check(outs, kinds, want):
    good = [o for o, k in zip(outs, kinds) if k is None]
    assert [o.outputs[0].token_ids for o in good] == want
    for out, kind in zip(outs, kinds):
        if kind is None:
            assert out.error is None and out.outputs[0].finish_reason == "length"
            continue
        assert out.finished and out.outputs[0].finish_reason == "error", kind
        assert isinstance(out.error, InvalidRequestError), kind
        assert kind.format(out.request_id) in str(out.error) and out.request_id in str(out.error)


def test_generate_returns_failed_outputs_and_keeps_the_others(tiny_model):
    llm = LLM(tiny_model, device="cpu", max_model_len=128, page_size=4, num_kv_pages=48,
              kernel_backend="reference")
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, [_good(i) for i in range(len(PROMPTS))])]
    steps_ahead = llm.engine.stats["steps_ahead"]
    prompts, params, kinds = _mixed()
    outs = llm.generate(prompts, params)
    _check(outs, kinds, want)
    by_kind = {k: o for o, k in zip(outs, kinds)}
    assert len(by_kind["logits processor #0 of request {} raised KeyError"].outputs[0].token_ids) == 2
    assert len(by_kind["returned NaN or +inf"].outputs[0].token_ids) == 3
    assert llm.engine.stats["steps_ahead"] > steps_ahead
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_pages and not llm.engine.requests

    # generate_stream: the failed requests end with an error output, the stream goes on
    final = {}
    for out in llm.generate_stream(prompts, params):
        assert out.request_id not in final
        if out.finished:
            final[out.request_id] = out
    _check(sorted(final.values(), key=lambda o: int(o.request_id)), kinds, want)
    assert bm.num_free_pages == bm.num_pages
    # and the engine goes on serving
    assert llm.generate([PROMPTS[1]], _good(1))[0].outputs[0].token_ids == want[1]


def test_rows_of_the_step_running_ahead_are_dropped(tiny_model):
    """Nobody waits, so every decode step is launched before the previous one's ids are read: a
    NaN row is only seen in the ids read back (its row of the next step is already queued), a
    raising processor fails inside a step that was itself launched ahead."""
    llm = LLM(tiny_model, device="cpu", max_model_len=128, page_size=4, kernel_backend="reference")
    good = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)]
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], good)]
    bad = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                          logits_processors=[_at(4, lambda x: x.masked_fill(x > 0, float("nan")))]),
           SamplingParams(temperature=0.5, seed=1, max_tokens=12, ignore_eos=True, logits_processors=[_at(6, _raise)])]
    before = llm.engine.stats["steps_ahead"]
    outs = llm.generate(PROMPTS[:2] + PROMPTS[2:4], good + bad)
    assert [o.outputs[0].token_ids for o in outs[:2]] == want
    assert [len(o.outputs[0].token_ids) for o in outs[2:]] == [4, 6]
    assert "NaN" in str(outs[2].error) and "KeyError" in str(outs[3].error)
    assert llm.engine.stats["steps_ahead"] - before >= 8
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_pages
