"""Steps that mix decodes with arrivals' prefill chunks (issue 19): run in parts (the decodes, then
each prefill chunk padded to its length bucket; model_runner.py) they give the tokens that one
joint step and requests run alone give; the engine keeps running ahead while requests wait; and the
device block tables, changed entry by entry, equal freshly built tables after every step, through
preemption, aborts and prefix-cache hits."""
import pytest
import torch

from stepvox import LLM, SamplingParams
from stepvox.engine.device.block_tables import pad_tables as _pad_tables
from stepvox.engine.step_times import StepTimes, step_kind
from stepvox.testing.logits import LogitsRecorder

PROMPTS = [list(range(300 + 7 * i, 300 + 7 * i + 5 + 3 * i)) for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)


def _llm(tiny_model, **options):
    base = dict(device="cpu", max_model_len=256, page_size=4, kernel_backend="reference")
    return LLM(tiny_model, **{**base, **options})


def _staggered(llm, params=GREEDY, every: int = 3):
    """Requests arriving one by one every few steps while the earlier ones decode; outputs by prompt."""
    engine = llm.engine
    ids, outs, step = [], {}, 0
    while len(ids) < len(PROMPTS) or engine.has_unfinished_requests():
        if len(ids) < len(PROMPTS) and step % every == 0:
            ids.append(engine.add_request(PROMPTS[len(ids)], params))
        for out in engine.step():
            outs[out.request_id] = out
        step += 1
    return [outs[i].outputs[0].token_ids for i in ids]


def test_mixed_steps_in_parts_give_the_tokens_of_joint_steps_and_of_requests_alone(tiny_model):
    alone = []
    single = _llm(tiny_model)
    for p in PROMPTS:
        alone.append(single.generate([p], GREEDY)[0].outputs[0].token_ids)
    split = _llm(tiny_model, split_mixed_steps=True)
    joint = _llm(tiny_model, split_mixed_steps=False, async_scheduling=False)
    got_split, got_joint = _staggered(split), _staggered(joint)
    assert got_split == alone and got_joint == alone
    times = split.engine.step_times                      # every step timed, by kind
    assert times.total() == split.engine.stats["steps"]
    assert sum(times.counts["mixed"]) > 0 and sum(times.counts["decode"]) > 0 and sum(times.counts["prefill"]) >= 1
    # the split engine ran its prefills through the bucket path, the joint one never did
    assert split.engine.executor.runner.prefill_statics and not joint.engine.executor.runner.prefill_statics


def test_a_bucket_padded_prefill_equals_the_joint_logits(tiny_model):
    """Prompts whose lengths are not buckets (19 -> 32, 27 -> 32), the second with a cached prefix
    (its context read from pages): the first logits equal a joint step's."""
    shared = list(range(500, 516))
    prompts = [shared + [7, 8, 9], shared + list(range(40, 51))]
    rows, cached = [], []
    for split in (True, False):
        llm = _llm(tiny_model, split_mixed_steps=split)
        got = []
        for p in prompts:
            rec = LogitsRecorder([0])
            out = llm.generate([p], SamplingParams(temperature=0, max_tokens=2, logits_processors=[rec]))[0]
            cached.append(out.metrics.num_cached_tokens)
            got.append(rec.rows[0])
        rows.append(got)
    assert cached == [0, 16, 0, 16]                       # the second prompt hit the prefix both times
    for a, b in zip(*rows):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap", [None, 3])
def test_async_scheduling_stays_on_while_requests_arrive(tiny_model, cap):
    """cap: prompt tokens a step computes while others decode (3: every prompt spans several steps)."""
    on = _llm(tiny_model, async_scheduling=True, max_prefill_while_decoding=cap)
    off = _llm(tiny_model, async_scheduling=False, max_prefill_while_decoding=None)
    assert _staggered(on) == _staggered(off)
    # every arrival joined a step launched ahead: the engine fell back to a synchronous step only
    # at the start and where a request finished (an ahead step then has nobody to plan for)
    stats = on.engine.stats
    assert stats["steps_ahead"] >= stats["steps"] - 2 * len(PROMPTS) - 2
    assert on.engine.block_manager.num_free_pages == on.engine.block_manager.num_pages


class TableCheck:
    """Wraps the runner's execute: after every step, the device rows of that step's sequences equal
    their block tables padded with zeros (what the runner built whole before), and the zero row
    stays zero."""

    def __init__(self, runner):
        self.runner, self.execute, self.checked = runner, runner.execute, 0
        runner.execute = self

    def __call__(self, plans, input_tokens=None):
        result = self.execute(plans, input_tokens)
        bt, width = self.runner.block_tables, self.runner.max_pages_per_seq
        device = bt.tables.cpu().numpy()
        assert (device == bt.mirror_array()).all()
        for c in plans:
            want = _pad_tables([c.block_table], width)[0]
            assert (device[bt.row_of(c.seq_id)] == want).all(), (c.seq_id, c.block_table)
            self.checked += 1
        assert not device[bt.pad_row].any()
        return result


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_device_block_tables_follow_preemption_aborts_and_prefix_hits(tiny_model, async_scheduling):
    shared = list(range(600, 624))
    prompts = [shared + [i, i + 1, i + 2] for i in range(5)] + PROMPTS
    llm = _llm(tiny_model, num_kv_pages=24, async_scheduling=async_scheduling)
    engine = llm.engine
    check = TableCheck(engine.executor.runner)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    steps, cached = 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                cached += out.metrics.num_cached_tokens
        steps += 1
        if steps == 6:
            engine.abort_request(ids[1])
            engine.abort_request(ids[6])
    assert engine.stats["preemptions"] > 0 and check.checked > 100 and cached > 0
    assert engine.block_manager.num_free_pages == 24


def test_step_kinds_and_the_cumulative_buckets():
    assert [step_kind(x) for x in ([1, 1], [1, 5], [7], [1])] == ["decode", "mixed", "prefill", "decode"]
    times = StepTimes((0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 3.0):
        times.observe("decode", seconds)
    assert times.cumulative("decode") == [("0.01", 2), ("0.1", 3), ("+Inf", 4)]
    assert times.cumulative("mixed") == [("0.01", 0), ("0.1", 0), ("+Inf", 0)]
    assert times.sums["decode"] == pytest.approx(3.065) and times.total() == 4
