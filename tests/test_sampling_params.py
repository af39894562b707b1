"""SamplingParams (engine/sampling_params.py): every field typed and bounded at construction, an
InvalidRequestError naming the field and the value, so a bad request fails where it is made and
never inside an engine step (issue 14, item 6: temperature NaN once emitted token 0 forever,
max_tokens 2.5 and top_k 2.5 were accepted, a seed >= 2**63 failed at step time)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stepvox.engine.errors import InvalidRequestError
from stepvox.engine.sampling_params import MAX_LIST_LEN, SamplingParams


def _ban_zero(output_ids, logits):
    return logits


def _with_prompt(prompt_ids, output_ids, logits):
    return logits


class _Callable:
    def __call__(self, output_ids, logits):
        return logits


def test_valid_values_are_accepted_and_normalised():
    p = SamplingParams(temperature=0, top_p=np.float32(0.5), top_k=np.int64(50), seed=2**63 - 1,
                       max_tokens=torch.tensor(8), min_tokens=8, stop_token_ids=(5, np.int32(6)),
                       logits_processors=(_ban_zero, _with_prompt, _Callable(), lambda *args: args[-1]),
                       repetition_aware=True, ignore_eos=True, skip_special_tokens=False)
    assert p.greedy and p.temperature == 0.0 and type(p.temperature) is float
    assert type(p.top_p) is float and type(p.top_k) is int and type(p.max_tokens) is int
    assert p.stop_token_ids == [5, 6] and all(type(t) is int for t in p.stop_token_ids)
    assert len(p.logits_processors) == 4
    assert SamplingParams(stop_token_ids=iter([1, 2])).stop_token_ids == [1, 2]
    for top_k in (-1, 0, 1, 10**6):
        SamplingParams(top_k=top_k)
    for temperature in (0.001, 0.7, 1, 100.0, 1e4):
        SamplingParams(temperature=temperature)
    assert SamplingParams(max_tokens=None, min_tokens=10**6).max_tokens is None
    assert SamplingParams(seed=0).seed == 0 and SamplingParams().seed is None


@pytest.mark.parametrize("field, value, says", [
    ("temperature", math.nan, r"temperature must be a finite number in \[0, 10000\], got nan"),
    ("temperature", math.inf, r"temperature must be a finite number in \[0, 10000\], got inf"),
    ("temperature", -0.5, r"temperature must be a finite number in \[0, 10000\], got -0.5"),
    ("temperature", 1e5, r"temperature must be a finite number in \[0, 10000\], got 100000.0"),
    ("temperature", "0.7", "temperature must be a number, got '0.7'"),
    ("temperature", None, "temperature must be a number, got None"),
    ("temperature", True, "temperature must be a number, got True"),
    ("temperature", 1e-9, r"temperature must be 0 \(greedy\) or at least 0.001, got 1e-09"),
    ("top_p", 0, r"top_p must be a finite number in \(0, 1\], got 0.0"),
    ("top_p", 1.5, r"top_p must be a finite number in \(0, 1\], got 1.5"),
    ("top_p", -0.1, r"top_p must be a finite number in \(0, 1\], got -0.1"),
    ("top_p", math.nan, r"top_p must be a finite number in \(0, 1\], got nan"),
    ("top_p", 1e-300, r"top_p must be in \(0, 1\] and at least 1.18e-38 \(float32\), got 1e-300"),
    ("top_p", "1", "top_p must be a number, got '1'"),
    ("top_k", 2.5, "top_k must be an integer, got 2.5"),
    ("top_k", "50", "top_k must be an integer, got '50'"),
    ("top_k", -2, r"top_k must be an integer in \[-1, 2147483647\], got -2"),
    ("top_k", 2**40, r"top_k must be an integer in \[-1, 2147483647\], got 1099511627776"),
    ("max_tokens", 2.5, "max_tokens must be an integer, got 2.5"),
    ("max_tokens", 0, r"max_tokens must be an integer in \[1, 2147483647\], got 0"),
    ("max_tokens", -3, r"max_tokens must be an integer in \[1, 2147483647\], got -3"),
    ("max_tokens", "16", "max_tokens must be an integer, got '16'"),
    ("min_tokens", -1, r"min_tokens must be an integer in \[0, 2147483647\], got -1"),
    ("min_tokens", 17, r"min_tokens \(17\) must not exceed max_tokens \(16\)"),
    ("min_tokens", 1.0, "min_tokens must be an integer, got 1.0"),
    ("seed", 2**63, r"seed must be an integer in \[0, 9223372036854775807\], got 9223372036854775808"),
    ("seed", -1, r"seed must be an integer in \[0, 9223372036854775807\], got -1"),
    ("seed", "7", "seed must be an integer, got '7'"),
    ("seed", True, "seed must be an integer, got True"),
    ("seed", 7.0, "seed must be an integer, got 7.0"),
    ("stop_token_ids", 5, "stop_token_ids must be a list of token ids, got 5"),
    ("stop_token_ids", "5", "stop_token_ids must be a list of token ids, got '5'"),
    ("stop_token_ids", ["5"], "stop_token_ids entry must be an integer, got '5'"),
    ("stop_token_ids", [1.0], "stop_token_ids entry must be an integer, got 1.0"),
    ("stop_token_ids", [True], "stop_token_ids entry must be an integer, got True"),
    ("stop_token_ids", [-1], r"stop_token_ids entry must be an integer in \[0, 2147483647\], got -1"),
    ("stop_token_ids", range(10**9), f"stop_token_ids: more than {MAX_LIST_LEN} entries"),
    ("logits_processors", _ban_zero, "logits_processors must be a list of functions"),
    ("logits_processors", [1], "logits_processors entries must be callables, got 1"),
    ("logits_processors", ["f"], "logits_processors entries must be callables, got 'f'"),
    ("logits_processors", [lambda logits: logits], "logits_processors: .* must take"),
    ("logits_processors", [lambda a, b, c, d: d], "logits_processors: .* must take"),
    ("repetition_aware", 1, "repetition_aware must be True or False, got 1"),
    ("repetition_aware", "yes", "repetition_aware must be True or False, got 'yes'"),
    ("ignore_eos", None, "ignore_eos must be True or False, got None"),
    ("skip_special_tokens", 0, "skip_special_tokens must be True or False, got 0"),
    ("detokenize", 0, "detokenize must be True or False, got 0"),
    ("detokenize", "no", "detokenize must be True or False, got 'no'"),
    ("detokenize", None, "detokenize must be True or False, got None"),
    ("n", 2, "only n=1 is supported"),
    ("n", "1", "n must be an integer, got '1'"),
])
def test_each_field_is_typed_and_bounded(field, value, says):
    with pytest.raises(InvalidRequestError, match=f"^{says}"):
        SamplingParams(**{field: value})


def test_detokenize_is_a_flag_on_by_default():
    assert SamplingParams().detokenize is True
    assert SamplingParams(detokenize=False).detokenize is False


def test_long_values_are_shortened_in_messages():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temperature="x" * 10_000)
    assert len(str(info.value)) < 120
