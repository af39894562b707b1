"""Sampler rules on crafted logits: greedy, top-k, top-p, seeds, min_tokens, the repetition rule;
a row whose processors or values fail fails alone."""
import pytest
import torch

from stepvox import SamplingParams
from stepvox.engine.errors import InvalidRequestError
from stepvox.engine.sampler import Sampler, repetition_banned_token
from stepvox.engine.sequence import Sequence


def _seq(params, tokens=(1, 2, 3), out=()):
    s = Sequence("r", list(tokens), params)
    s.token_ids += list(out)
    return s


def _draw(params, logits, n=400, seed=0):
    sampler = Sampler(torch.device("cpu"), eos_token_id=3, seed=seed)
    seqs = [_seq(params) for _ in range(n)]
    return sampler(logits.repeat(n, 1), seqs)


def test_greedy_takes_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    assert Sampler(torch.device("cpu"), 3)(logits, [_seq(SamplingParams(temperature=0))]) == [1]


def test_top_k_and_top_p_limit_the_support():
    logits = torch.log(torch.tensor([[0.40, 0.30, 0.20, 0.06, 0.04]]))
    drawn = set(_draw(SamplingParams(temperature=1.0, top_k=2), logits))
    assert drawn == {0, 1}
    drawn = set(_draw(SamplingParams(temperature=1.0, top_p=0.85), logits))
    assert drawn == {0, 1, 2}                   # 0.4 + 0.3 < 0.85 <= 0.4 + 0.3 + 0.2
    drawn = set(_draw(SamplingParams(temperature=1.0), logits))
    assert drawn == {0, 1, 2, 3, 4}


def test_sampling_frequencies_follow_temperature():
    logits = torch.log(torch.tensor([[0.7, 0.3]]))
    hot = _draw(SamplingParams(temperature=1.0), logits, n=4000)
    assert abs(sum(t == 0 for t in hot) / 4000 - 0.7) < 0.04
    cold = _draw(SamplingParams(temperature=0.25), logits, n=4000)   # p0 = .7^4 / (.7^4 + .3^4) = 0.967
    assert abs(sum(t == 0 for t in cold) / 4000 - 0.967) < 0.02


def test_seeded_requests_repeat_and_differ_by_seed():
    logits = torch.randn(1, 1000)
    def run(seed):
        sampler = Sampler(torch.device("cpu"), 3, seed=123)
        seq = _seq(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits.clone(), [seq])[0] for _ in range(20)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_min_tokens_masks_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 0.0, 10.0, 5.0]])        # id 3 (eos) would win
    sampler = Sampler(torch.device("cpu"), eos_token_id=3)
    early = _seq(SamplingParams(temperature=0, min_tokens=2), out=[4])
    assert sampler(logits.clone(), [early]) == [4]
    late = _seq(SamplingParams(temperature=0, min_tokens=2), out=[4, 4])
    assert sampler(logits.clone(), [late]) == [3]


def test_repetition_rule_matches_step_audio():
    assert repetition_banned_token([5] * 9) is None              # window not full yet
    assert repetition_banned_token([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) is None
    assert repetition_banned_token([7, 2, 3, 4, 5, 6, 8, 9, 1, 7]) == 7
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    seq = _seq(SamplingParams(temperature=0, repetition_aware=True), tokens=[7, 1, 2, 3, 4, 5, 6, 1, 2, 7])
    assert Sampler(torch.device("cpu"), 3)(logits, [seq]) != [7]


def test_user_logits_processors_of_both_arities():
    def ban_zero(output_ids, logits):
        logits[0] = float("-inf")
        return logits

    def prefer_prompt_len(prompt_ids, output_ids, logits):
        logits[len(prompt_ids)] += 100.0
        return logits
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]])
    seq = _seq(SamplingParams(temperature=0, logits_processors=[ban_zero]))
    assert Sampler(torch.device("cpu"), 3)(logits.clone(), [seq]) == [1]
    seq = _seq(SamplingParams(temperature=0, logits_processors=[prefer_prompt_len]), tokens=[1, 1])
    assert Sampler(torch.device("cpu"), 3)(logits.clone(), [seq]) == [2]


def _fused_sampler(seed=0):
    """The sampler's Triton path (kernels/sampling.py), run by the interpreter on small rows."""
    return Sampler(torch.device("cpu"), eos_token_id=3, seed=seed, fused=True, backend="triton")


def _fused_applies(logits, seqs):
    sampler = _fused_sampler()
    plans, failed = sampler._plan_rows(seqs, logits.shape[1])
    return not failed and sampler._fused_applies(logits, plans)


def test_fused_path_limits_the_support_and_repeats_by_seed():
    logits = torch.log(torch.tensor([[0.40, 0.30, 0.20, 0.06, 0.04] + [0.0001] * 95]))
    sampler = _fused_sampler()
    seqs = [_seq(SamplingParams(temperature=1.0, top_k=2)) for _ in range(12)]
    drawn = sampler(logits.repeat(12, 1), seqs)
    assert set(drawn) == {0, 1}                            # 12 draws of p = .57 / .43 hit both
    seeded = [_seq(SamplingParams(temperature=0.7, top_k=50, seed=s)) for s in (5, 5, 6)]
    a = sampler(logits.repeat(3, 1), seeded)
    b = _fused_sampler(seed=99)(logits.repeat(3, 1), seeded)
    assert a[0] == a[1] and a == b                         # the request seed decides, not the engine's
    assert _fused_applies(logits, seeded)
    assert not _fused_applies(logits, [_seq(SamplingParams(top_p=0.9, top_k=5))])
    assert not _fused_applies(logits, [_seq(SamplingParams(top_k=100))])


def test_fused_path_applies_min_tokens_and_the_repetition_rule():
    logits = torch.tensor([[0.0, 0.0, 0.0, 10.0, 5.0, 4.0] + [-9.0] * 58])
    sampler = _fused_sampler()
    early = _seq(SamplingParams(temperature=0, min_tokens=2), out=[4])
    assert sampler(logits.clone(), [early]) == [4]          # eos (3) masked: greedy takes 4
    repeated = _seq(SamplingParams(temperature=0, repetition_aware=True), tokens=[1] * 8, out=[4, 4])
    assert sampler(logits.clone(), [repeated]) == [3]       # 4 banned after filling 2 of the last 10
    hot = _seq(SamplingParams(temperature=0.5, top_k=1, min_tokens=3), out=[7])
    assert sampler(logits.clone(), [hot]) == [4]            # top-1 after masking eos


def _rows_with_bad_processors():
    """Rows 1-4 go wrong in their own ways; rows 0 (greedy) and 5 (seeded) are fine."""
    def boom(output_ids, logits):
        raise ValueError("boom")
    return [_seq(SamplingParams(temperature=0)),
            _seq(SamplingParams(temperature=0, logits_processors=[lambda o, x: x, boom])),
            _seq(SamplingParams(temperature=0.7, top_k=5, logits_processors=[lambda o, x: x[None]])),
            _seq(SamplingParams(temperature=0, logits_processors=[lambda o, x: x * float("nan")])),
            _seq(SamplingParams(temperature=0.7, top_k=5,
                                logits_processors=[lambda o, x: torch.full_like(x, -torch.inf)])),
            _seq(SamplingParams(temperature=0.9, top_k=5, seed=4))]


def test_a_row_whose_processor_fails_fails_alone():
    def sampler():
        return Sampler(torch.device("cpu"), eos_token_id=3)
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    seqs = _rows_with_bad_processors()
    sampled = sampler().sample(logits.clone(), seqs)
    tokens = sampled.tokens.tolist()
    failed = sampled.failures(tokens)
    assert sorted(failed) == [1, 2, 3, 4]
    assert "logits processor #1 of request r raised ValueError: boom" in str(failed[1])
    assert "processor #0 of request r returned shape (1, 64), not its row's (64,)" in str(failed[2])
    assert "returned NaN or +inf logits" in str(failed[3])
    assert "masked every token" in str(failed[4])
    assert all(isinstance(e, InvalidRequestError) for e in failed.values())
    assert all(0 <= t < 64 for t in sampled.feed().tolist())       # what a step launched ahead is fed
    fresh = _rows_with_bad_processors()
    alone = [sampler()(logits[i:i + 1].clone(), [fresh[i]])[0] for i in (0, 5)]
    assert [tokens[0], tokens[5]] == alone
    with pytest.raises(InvalidRequestError, match="#1 of request r raised ValueError"):
        sampler()(logits.clone(), _rows_with_bad_processors())            # __call__ raises


def test_a_row_whose_processor_fails_fails_alone_on_the_fused_path():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    seqs = [_seq(SamplingParams(temperature=0.7, top_k=5, seed=1))] + _rows_with_bad_processors()[3:5]
    assert _fused_applies(logits, seqs)
    sampled = _fused_sampler().sample(logits.clone(), seqs)
    failed = sampled.failures(sampled.tokens.tolist())
    assert sorted(failed) == [1, 2] and "NaN" in str(failed[1]) and "masked every token" in str(failed[2])
    assert all(0 <= t < 64 for t in sampled.feed().tolist())
    assert sampled.tokens.tolist()[0] in logits[0].topk(5).indices.tolist()


def test_unusable_values_fail_their_row_only():
    logits = torch.randn(3, 64)
    good = _seq(SamplingParams(temperature=0))
    bad_seed, bad_temperature = _seq(SamplingParams(temperature=0.5)), _seq(SamplingParams(temperature=0.5))
    object.__setattr__(bad_seed.params, "seed", 2 ** 64)            # values that slipped past validation
    object.__setattr__(bad_temperature.params, "temperature", "hot")
    sampled = Sampler(torch.device("cpu"), 3).sample(logits.clone(), [bad_seed, good, bad_temperature])
    failed = sampled.failures(sampled.tokens.tolist())
    assert sorted(failed) == [0, 2]
    assert "reading the sampling parameters of request r raised ValueError" in str(failed[0])
    assert sampled.tokens.tolist()[1] == logits[1].argmax().item()
