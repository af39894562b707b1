"""Property-based tests of the three validation boundaries of issue 14's "Done when": SamplingParams,
engine options (EngineConfig.validate against a model) and config.json values (Step1Config.from_dict,
and from_folder on raw file text). 2200 generated cases in all:

- arbitrary values (the right type, the wrong type, NaN, inf, huge, negative, bools, strings,
  NumPy and torch scalars, containers, objects) raise nothing but the boundary's StepvoxError
  subclass, and whatever is accepted satisfies the documented bounds;
- values drawn from the documented ranges are always accepted.

Derandomized (the same cases every run) and without a deadline, so the run is reproducible and
its time is stable (a few seconds on two cores)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepvox.engine import special_tokens as stok
from stepvox.engine.config import CONFIG_LIMITS, TINY, EngineConfig, Step1Config
from stepvox.engine.errors import CheckpointError, ConfigError, InvalidRequestError, StepvoxError
from stepvox.engine.sampling_params import (MAX_SEED, MAX_TEMPERATURE, MAX_TOKENS, MIN_TEMPERATURE,
                                            SamplingParams)
from stepvox.kernels import BACKENDS
from stepvox.testing.step1 import config_dict


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _processor(output_ids, logits):
    return logits


def _processor_with_prompt(prompt_ids, output_ids, logits):
    return logits


ANY_NUMBER = st.one_of(
    st.integers(), st.integers(min_value=-2**80, max_value=2**80), st.floats(),       # floats: NaN and +-inf too
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**12, 1e12, 1e9, 1e-320, -0.0, 0.5, 2.5]),
    st.builds(np.int64, st.integers(min_value=-2**63, max_value=2**63 - 1)),
    st.builds(np.float32, st.floats(width=32)),
    st.builds(torch.tensor, st.integers(min_value=-2**40, max_value=2**40)),
    st.builds(torch.tensor, st.floats(width=32)),
)
ANY_VALUE = st.one_of(
    ANY_NUMBER, st.none(), st.booleans(), st.builds(np.bool_, st.booleans()), st.text(max_size=6),
    st.sampled_from(["64", "3", "nan", "auto", "cpu", "cuda", "cuda:0", "banana", "", "x" * 500]),
    st.lists(st.integers(min_value=-5, max_value=10**6), max_size=4), st.binary(max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(object()), st.just(print),
    st.just(_processor), st.just(torch.float16), st.just(torch.int8), st.builds(torch.device, st.just("cpu")),
    st.builds(torch.zeros, st.integers(min_value=1, max_value=3)),
)


def _fields(valid: dict, mixed: bool):
    """Keyword arguments: each field absent, or a valid value, or (mixed) an arbitrary one."""
    return st.fixed_dictionaries({}, optional={k: st.one_of(v, ANY_VALUE) if mixed else v for k, v in valid.items()})


# ---------------------------------------------------------------- SamplingParams
VALID_SAMPLING = dict(
    temperature=st.one_of(st.just(0), st.floats(min_value=MIN_TEMPERATURE, max_value=MAX_TEMPERATURE)),
    top_p=st.floats(min_value=1e-6, max_value=1.0),
    top_k=st.integers(min_value=-1, max_value=2**31 - 1),
    seed=st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_SEED)),
    max_tokens=st.one_of(st.none(), st.integers(min_value=16, max_value=MAX_TOKENS)),   # >= the largest min_tokens
    min_tokens=st.integers(min_value=0, max_value=16),                 # <= the default max_tokens
    stop_token_ids=st.one_of(st.none(), st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=8)),
    ignore_eos=st.booleans(), repetition_aware=st.booleans(), skip_special_tokens=st.booleans(),
    logits_processors=st.one_of(st.none(), st.lists(st.sampled_from([_processor, _processor_with_prompt]),
                                                    max_size=3)),
    n=st.just(1),
)


def _check_accepted_sampling(p: SamplingParams) -> None:
    assert type(p.temperature) is float and (p.temperature == 0 or MIN_TEMPERATURE <= p.temperature <= MAX_TEMPERATURE)
    assert type(p.top_p) is float and 0 < p.top_p <= 1
    assert type(p.top_k) is int and p.top_k >= -1
    assert p.seed is None or (type(p.seed) is int and 0 <= p.seed <= MAX_SEED)
    assert p.max_tokens is None or (type(p.max_tokens) is int and 1 <= p.max_tokens <= MAX_TOKENS)
    assert type(p.min_tokens) is int and 0 <= p.min_tokens <= (p.max_tokens or MAX_TOKENS)
    assert all(type(t) is int and t >= 0 for t in p.stop_token_ids)
    assert all(callable(f) for f in p.logits_processors)
    assert all(type(getattr(p, f)) is bool for f in ("ignore_eos", "repetition_aware", "skip_special_tokens"))


@fuzz(600)
@given(_fields(VALID_SAMPLING, mixed=True))
def test_sampling_params_raise_only_invalid_request_errors(kwargs):
    try:
        params = SamplingParams(**kwargs)
    except InvalidRequestError:
        return
    _check_accepted_sampling(params)


@fuzz(200)
@given(_fields(VALID_SAMPLING, mixed=False))
def test_valid_sampling_params_are_accepted(kwargs):
    _check_accepted_sampling(SamplingParams(**kwargs))


# ---------------------------------------------------------------- engine options
TINY_CFG = Step1Config.from_shape(TINY)          # 2048 tokens, 2 KV groups

VALID_ENGINE = dict(
    device=st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:3", torch.device("cpu")]),
    dtype=st.sampled_from(["auto", "bf16", "float16", "fp32", torch.bfloat16, torch.float16, torch.float32]),
    max_model_len=st.one_of(st.none(), st.integers(min_value=1, max_value=TINY["max_seq_len"])),
    max_num_seqs=st.integers(min_value=1, max_value=1024),
    max_num_batched_tokens=st.integers(min_value=1, max_value=65536),
    page_size=st.integers(min_value=1, max_value=1024),
    num_kv_pages=st.one_of(st.none(), st.integers(min_value=1, max_value=10**5)),
    gpu_memory_utilization=st.floats(min_value=1e-3, max_value=1.0),
    enable_prefix_caching=st.booleans(), enforce_eager=st.booleans(), async_scheduling=st.booleans(),
    pdl=st.booleans(), fused_decode=st.booleans(), triton_sampling=st.booleans(),
    custom_all_reduce=st.booleans(), kv_cache_dtype=st.sampled_from(["auto", "fp8"]),
    cuda_graph_max_batch=st.integers(min_value=1, max_value=512),
    tensor_parallel_size=st.sampled_from([1, 2]),
    distributed_executor=st.sampled_from(["auto", "mp"]),
    seed=st.integers(min_value=0, max_value=2**63 - 1),
    kernel_backend=st.sampled_from(BACKENDS),
    gemv_max_rows=st.integers(min_value=0, max_value=16),
    gemv_tiles=st.sampled_from([None, lambda n, k: None]),
    max_buffer_bytes=st.integers(min_value=1 << 30, max_value=1 << 40),
)


def _check_accepted_engine(ecfg: EngineConfig) -> None:
    for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "cuda_graph_max_batch",
                 "tensor_parallel_size", "seed", "gemv_max_rows"):
        assert type(getattr(ecfg, name)) is int, name
    assert ecfg.max_model_len is None or 1 <= ecfg.max_model_len <= TINY_CFG.max_seq_len
    assert type(ecfg.gpu_memory_utilization) is float and 0 < ecfg.gpu_memory_utilization <= 1
    model_len = ecfg.model_len(TINY_CFG)
    assert sum(b for b, _ in ecfg.buffer_bytes(model_len).values()) <= ecfg.max_buffer_bytes


@fuzz(400)
@given(_fields(VALID_ENGINE, mixed=True))
def test_engine_options_raise_only_config_errors(kwargs):
    ecfg = EngineConfig(**kwargs)
    try:
        ecfg.validate(TINY_CFG)
    except ConfigError:
        return
    _check_accepted_engine(ecfg)


@fuzz(200)
@given(_fields(VALID_ENGINE, mixed=False))
def test_valid_engine_options_are_accepted(kwargs):
    ecfg = EngineConfig(**kwargs)
    ecfg.validate(TINY_CFG)
    _check_accepted_engine(ecfg)


# ---------------------------------------------------------------- config.json
@st.composite
def valid_configs(draw) -> dict:
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    heads = groups * draw(st.integers(min_value=1, max_value=8))
    vocab = draw(st.integers(min_value=stok.AUDIO_TOKENS_END, max_value=CONFIG_LIMITS["vocab_size"]))
    raw = config_dict(hidden_size=heads * draw(st.sampled_from([8, 16, 64, 128])), num_attention_heads=heads,
                      num_attention_groups=groups, num_hidden_layers=draw(st.integers(min_value=1, max_value=1024)),
                      intermediate_size=draw(st.integers(min_value=1, max_value=CONFIG_LIMITS["intermediate_size"])),
                      vocab_size=vocab,
                      max_seq_len=draw(st.integers(min_value=1, max_value=CONFIG_LIMITS["max_seq_len"])),
                      rms_norm_eps=draw(st.floats(min_value=1e-12, max_value=0.1)))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        raw[key] = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=vocab - 1)))
    return raw


CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_attention_groups",
               "num_hidden_layers", "vocab_size", "max_seq_len", "rms_norm_eps", "bos_token_id", "eos_token_id",
               "pad_token_id", "model_type", "architectures", "torch_dtype", "quantization_config")


@st.composite
def mutated_configs(draw):
    """A valid config with some keys replaced by arbitrary values, removed, or added; or not a dict."""
    raw = draw(valid_configs())
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=4, unique=True)):
        if draw(st.booleans()):
            raw[key] = draw(ANY_VALUE)
        else:
            raw.pop(key, None)
    return draw(st.one_of(st.just(raw), st.just(raw), st.just(raw), ANY_VALUE))


def _check_accepted_config(cfg: Step1Config) -> None:
    kinds = {"rms_norm_eps": (float,), "quantization": (type(None), str), "quantized_lm_head": (bool,)}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        assert type(value) in kinds.get(f.name, (int,)), f.name
    assert cfg.quantization in (None, "fp8")
    assert cfg.hidden_size % cfg.num_attention_heads == 0 and cfg.num_attention_heads % cfg.num_attention_groups == 0
    assert stok.AUDIO_TOKENS_END <= cfg.vocab_size and 1 <= cfg.max_seq_len <= CONFIG_LIMITS["max_seq_len"]
    assert 0 < cfg.rms_norm_eps <= 0.1 and math.isfinite(cfg.rms_norm_eps)
    assert all(0 <= t < cfg.vocab_size for t in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id))


@fuzz(400)
@given(mutated_configs())
def test_config_values_raise_only_checkpoint_errors(raw):
    try:
        cfg = Step1Config.from_dict(raw)
    except CheckpointError:
        return
    _check_accepted_config(cfg)


@fuzz(200)
@given(valid_configs())
def test_valid_config_values_are_accepted(raw):
    cfg = Step1Config.from_dict(raw)
    _check_accepted_config(cfg)
    assert cfg.hidden_size == raw["hidden_size"] and cfg.max_seq_len == raw["max_seq_len"]


def _as_text(raw) -> str:
    try:
        return json.dumps(raw)
    except (TypeError, ValueError):
        return repr(raw)                      # not JSON-serialisable: the file holds its repr, also not JSON


@fuzz(200)
@given(st.one_of(mutated_configs().map(_as_text), st.text(max_size=40),
                 st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_config_json_files_raise_only_checkpoint_errors(text):
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            cfg = Step1Config.from_folder(folder)
        except CheckpointError:
            return
        _check_accepted_config(cfg)


def test_every_boundary_error_is_a_stepvox_error():
    assert all(issubclass(e, StepvoxError) for e in (InvalidRequestError, ConfigError, CheckpointError))
