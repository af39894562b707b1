"""Validation at the boundary of engine/config.py: config.json values (Step1Config.from_dict /
from_folder) give CheckpointError naming the field and the value; engine options (EngineConfig.
validate) give ConfigError naming the option, and the memory they imply is checked before anything
is allocated (issue 14, item 6)."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from stepvox.engine.config import CHAT_130B, CONFIG_LIMITS, TINY, TTS_3B, EngineConfig, Step1Config
from stepvox.engine.errors import CheckpointError, ConfigError
from stepvox.llm import LLM
from stepvox.testing.step1 import config_dict


# ---------------------------------------------------------------- config.json
def test_released_shapes_and_the_tiny_one_are_accepted():
    for shape in (TTS_3B, CHAT_130B, TINY):
        cfg = Step1Config.from_dict(config_dict(**shape))
        assert cfg.hidden_size == shape["hidden_size"] and cfg.max_seq_len == shape["max_seq_len"]
    cfg = Step1Config.from_dict(config_dict(pad_token_id=None, bos_token_id=None))   # HF writes nulls
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 3)


@pytest.mark.parametrize("field, value, says", [
    ("hidden_size", "64", "hidden_size must be an integer, got '64'"),
    ("hidden_size", 0, "hidden_size must be an integer in [1, 65536], got 0"),
    ("hidden_size", -64, "hidden_size must be an integer in [1, 65536], got -64"),
    ("hidden_size", 64.0, "hidden_size must be an integer, got 64.0"),
    ("hidden_size", True, "hidden_size must be an integer, got True"),
    ("hidden_size", None, "hidden_size must be an integer, got None"),
    ("num_attention_groups", 0, "num_attention_groups must be an integer in [1, 4], got 0"),
    ("num_attention_groups", 8, "num_attention_groups must be an integer in [1, 4], got 8"),
    ("num_attention_heads", [4], "num_attention_heads must be an integer, got [4]"),
    ("num_hidden_layers", 10**6, "num_hidden_layers must be an integer in [1, 1024], got 1000000"),
    ("intermediate_size", 1e12, "intermediate_size must be an integer, got 1000000000000.0"),
    ("vocab_size", 65536, "vocab_size must be an integer in [70656, 4194304], got 65536"),
    ("max_seq_len", 1e12, "max_seq_len must be an integer, got 1000000000000.0"),
    ("max_seq_len", 10**12, "max_seq_len must be an integer in [1, 1048576], got 1000000000000"),
    ("rms_norm_eps", "x", "rms_norm_eps must be a number, got 'x'"),
    ("rms_norm_eps", math.nan, "rms_norm_eps must be a finite number in (0, 0.1], got nan"),
    ("rms_norm_eps", math.inf, "rms_norm_eps must be a finite number in (0, 0.1], got inf"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a finite number in (0, 0.1], got 0.0"),
    ("rms_norm_eps", -1e-5, "rms_norm_eps must be a finite number in (0, 0.1], got -1e-05"),
    ("eos_token_id", "3", "eos_token_id must be an integer, got '3'"),
    ("eos_token_id", 74752, "eos_token_id must be an integer in [0, 74751], got 74752"),
    ("bos_token_id", False, "bos_token_id must be an integer, got False"),
    ("pad_token_id", -1, "pad_token_id must be an integer in [0, 74751], got -1"),
    ("architectures", "Step1ForCausalLM", "architectures must be a list of names, got 'Step1ForCausalLM'"),
    ("architectures", [5], "architectures must be a list of names, got [5]"),
    ("model_type", 7, "not a Step1 model: model_type=7"),
])
def test_config_values_are_typed_and_bounded(field, value, says):
    raw = config_dict()
    raw[field] = value
    with pytest.raises(CheckpointError) as info:
        Step1Config.from_dict(raw)
    assert str(info.value).startswith(f"config.json: {says}")


def test_config_shapes_must_divide():
    with pytest.raises(CheckpointError, match="hidden_size 64 is not a multiple of 6 heads"):
        Step1Config.from_dict(config_dict(num_attention_heads=6, num_attention_groups=1))
    with pytest.raises(CheckpointError, match="4 heads do not divide into 3 KV groups"):
        Step1Config.from_dict(config_dict(num_attention_groups=3))


@pytest.mark.parametrize("raw", [[], "step1", 3, None, [config_dict()]])
def test_config_that_is_not_an_object(raw):
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object"):
        Step1Config.from_dict(raw)


def test_config_limits_are_an_argument():
    raw = config_dict(max_seq_len=4096)
    with pytest.raises(CheckpointError, match=r"max_seq_len must be an integer in \[1, 2048\], got 4096"):
        Step1Config.from_dict(raw, limits={**CONFIG_LIMITS, "max_seq_len": 2048})
    assert Step1Config.from_dict(raw).max_seq_len == 4096


@pytest.mark.parametrize("text, says", [
    ("{", "is not valid JSON"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "is not valid JSON"),           # over Python's int-digit limit
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),                   # nesting deeper than the recursion limit
    ('[1, 2]', "expected a JSON object, found list"),
    ('{"hidden_size": NaN}', "lacks"),
])
def test_config_json_files(tmp_path, text, says):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=says) as info:
        Step1Config.from_folder(str(tmp_path))
    assert str(tmp_path / "config.json") in str(info.value)


def test_config_json_files_name_the_file_and_the_field(tmp_path):
    raw = config_dict(rms_norm_eps=math.nan)
    (tmp_path / "config.json").write_text(json.dumps(raw))               # json writes NaN, and reads it back
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/config.json: rms_norm_eps must be a finite number"):
        Step1Config.from_folder(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        Step1Config.from_folder(str(tmp_path))
    (tmp_path / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(CheckpointError, match="too large for a config.json"):
        Step1Config.from_folder(str(tmp_path))


def test_an_absurd_max_seq_len_is_refused_before_the_engine_allocates(tmp_path, tiny_model):
    """max_seq_len 1e12 once sized block tables of 512 TB; now the folder is refused at once."""
    folder = tmp_path / "huge"
    folder.mkdir()
    raw = json.load(open(f"{tiny_model}/config.json"))
    raw["max_seq_len"] = 10**12
    (folder / "config.json").write_text(json.dumps(raw))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="max_seq_len must be an integer in"):
        LLM(str(folder), device="cpu", kernel_backend="reference")
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------- engine options
def test_default_and_test_options_are_accepted():
    tiny = Step1Config.from_shape(TINY)
    for options in ({}, dict(device="cpu", max_model_len=512, page_size=4, num_kv_pages=14),
                    dict(device="cuda:1", dtype=torch.bfloat16, seed=2**63 - 1, gpu_memory_utilization=1),
                    dict(max_num_batched_tokens=8192, max_num_seqs=64, cuda_graph_max_batch=64, dtype="fp16")):
        ecfg = EngineConfig(**options)
        ecfg.validate()
        ecfg.validate(tiny)
        ecfg.validate(Step1Config.from_shape(TTS_3B))
    ecfg = EngineConfig(max_num_seqs=torch.tensor(8), gpu_memory_utilization=np.float32(0.5))
    ecfg.validate()
    assert type(ecfg.max_num_seqs) is int and type(ecfg.gpu_memory_utilization) is float


@pytest.mark.parametrize("option, value, says", [
    ("max_model_len", -5, r"max_model_len must be an integer in \[1, 1048576\], got -5"),
    ("max_model_len", 0, r"max_model_len must be an integer in \[1, 1048576\], got 0"),
    ("max_num_batched_tokens", 1e9, "max_num_batched_tokens must be an integer, got 1000000000.0"),
    ("max_num_seqs", 0, r"max_num_seqs must be an integer >= 1, got 0"),
    ("max_num_seqs", "8", "max_num_seqs must be an integer, got '8'"),
    ("page_size", 0, r"page_size must be an integer in \[1, 1024\], got 0"),
    ("page_size", 2.5, "page_size must be an integer, got 2.5"),
    ("num_kv_pages", -1, "num_kv_pages must be an integer >= 1, got -1"),
    ("cuda_graph_max_batch", 0, "cuda_graph_max_batch must be an integer >= 1, got 0"),
    ("gpu_memory_utilization", math.nan, r"gpu_memory_utilization must be a finite number in \(0, 1\], got nan"),
    ("gpu_memory_utilization", 0, r"gpu_memory_utilization must be a finite number in \(0, 1\], got 0.0"),
    ("gpu_memory_utilization", "0.9", "gpu_memory_utilization must be a number, got '0.9'"),
    ("seed", "0", "seed must be an integer, got '0'"),
    ("seed", True, "seed must be an integer, got True"),
    ("seed", 2**64, r"seed must be an integer in \[0, 9223372036854775807\]"),
    ("seed", -1, r"seed must be an integer in \[0, 9223372036854775807\], got -1"),
    ("tensor_parallel_size", 0, r"tensor_parallel_size must be an integer in \[1, 64\], got 0"),
    ("gemv_max_rows", 17, r"gemv_max_rows must be an integer in \[0, 16\], got 17"),
    ("device", "banana", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'banana'"),
    ("device", "mps", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'mps'"),
    ("device", 0, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 0"),
    ("dtype", "int8", "dtype must be 'auto' or one of"),
    ("dtype", torch.int8, "dtype must be one of torch.bfloat16, torch.float16, torch.float32, got torch.int8"),
    ("dtype", 16, "dtype must be 'auto' or one of .*got 16"),
    ("enforce_eager", "yes", "enforce_eager must be True or False, got 'yes'"),
    ("enable_prefix_caching", 1, "enable_prefix_caching must be True or False, got 1"),
    ("distributed_executor", "ray", "distributed_executor must be one of 'auto', 'mp', got 'ray'"),
    ("kernel_backend", None, "kernel_backend must be one of"),
    ("gemv_tiles", {}, "gemv_tiles must be a function"),
])
def test_engine_options_are_typed_and_bounded(option, value, says):
    with pytest.raises(ConfigError, match=f"^{says}"):
        EngineConfig(**{option: value}).validate()


@pytest.mark.parametrize("options, named", [
    (dict(max_num_batched_tokens=10**9), "max_num_batched_tokens=1000000000"),
    (dict(max_num_seqs=10**7), "max_num_seqs=10000000"),
    (dict(max_num_seqs=65536, page_size=1), "max_num_seqs=65536"),
    (dict(num_kv_pages=10**8), "num_kv_pages=100000000"),
])
def test_the_memory_options_imply_is_checked_against_a_stated_limit(options, named):
    """max_num_batched_tokens=1e9 or max_num_seqs=1e7 once used 8+ GB at construction."""
    with pytest.raises(ConfigError, match=rf"^{named} needs [\d,]+ MiB of host and device buffers before any "
                                          rf"request .* over the limit max_buffer_bytes=1073741824"):
        EngineConfig(max_model_len=2048, **options).validate()
    raised = EngineConfig(max_model_len=2048, max_buffer_bytes=1 << 50, **options)
    raised.validate()                                      # the limit is an option too


def test_the_model_context_enters_the_memory_check():
    many = EngineConfig(max_num_seqs=8192, page_size=4)
    many.validate()                                        # the context is not known yet
    many.validate(Step1Config.from_shape(TINY))            # 2048 tokens: 512 pages x 8192 sequences fit
    with pytest.raises(ConfigError, match="^max_num_seqs=8192 needs .* device block tables of 8192 sequences x "
                                          r"8192 pages \(max_model_len 32768 / page_size 4\)"):
        many.validate(Step1Config.from_shape(TTS_3B))
    parts = EngineConfig().buffer_bytes(32768)
    # the device rows, their staging's three sets (every row rewritten whole, at worst) and the step's lengths
    assert parts["max_num_seqs"][0] == (257 * 2048 + 3 * (2 * 256 * 2048 + 256)) * 4 + 3 * (4 * 256 + 1) * 4
    assert sum(b for b, _ in parts.values()) < 18 << 20   # the defaults need about 17 MiB


def test_options_against_the_model():
    tiny = Step1Config.from_shape(TINY)
    with pytest.raises(ConfigError, match="max_model_len 4096 exceeds the model's max_seq_len 2048"):
        EngineConfig(max_model_len=4096).validate(tiny)
    with pytest.raises(ConfigError, match="tensor_parallel_size 4 must divide the 2 KV groups"):
        EngineConfig(tensor_parallel_size=4).validate(tiny)
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 must divide the 2 KV groups"):
        EngineConfig(tensor_parallel_size=3).model_len(tiny)     # every sizing goes through model_len
    assert EngineConfig(max_model_len=100).model_len(tiny) == 100
    assert EngineConfig().model_len(tiny) == 2048


def test_engine_refuses_bad_options_before_allocating(tiny_model):
    """Through LLM: the options fail at construction with ConfigError, in well under a second of
    work, instead of allocating gigabytes (or, for max_model_len=-5, refusing every prompt later)."""
    for options, says in ((dict(max_num_seqs=10**7), "max_num_seqs=10000000 needs"),
                          (dict(max_num_batched_tokens=10**9), "max_num_batched_tokens=1000000000 needs"),
                          (dict(max_model_len=-5), "max_model_len must be an integer"),
                          (dict(num_kv_pages=0), "num_kv_pages must be an integer >= 1, got 0")):
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=says):
            LLM(tiny_model, device="cpu", kernel_backend="reference", **options)
        assert time.perf_counter() - t0 < 5
