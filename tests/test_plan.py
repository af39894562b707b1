"""`stepvox plan` (python/stepvox/plan.py): weights per rank, KV tokens that fit and the decode floor
for each tensor-parallel degree of the 130B chat model."""
import pytest

from stepvox.engine.config import CHAT_130B, Step1Config
from stepvox.engine.errors import ConfigError
from stepvox.plan import plan_rows, rank_weight_bytes
from stepvox.testing.step1 import config_dict


def test_plan_for_the_chat_model():
    cfg = Step1Config.from_dict(config_dict(**CHAT_130B))
    assert rank_weight_bytes(cfg, 1) == 263_893_180_416          # the released index's total_size
    rows = {r["tp"]: r for r in plan_rows(cfg, [2, 3, 4, 8], 80, 3.35, 0.9)}
    assert "does not fit" in rows[2]["note"]
    assert "must divide" in rows[3]["note"]
    assert rows[4]["kv_tokens"] > 10_000 and abs(rows[4]["floor_ms"] - 19.7) < 0.1
    assert rows[8]["kv_tokens"] > 2 * rows[4]["kv_tokens"]


def test_plan_arguments_are_checked():
    """`plan --tp 0` once divided by zero and `--tp -2` printed a table of negative sizes."""
    cfg = Step1Config.from_dict(config_dict(**CHAT_130B))
    for args, says in [(([0], 80, 3.35, 0.9), r"tp must be an integer >= 1, got 0"),
                       (([-2], 80, 3.35, 0.9), r"tp must be an integer >= 1, got -2"),
                       (([2.0], 80, 3.35, 0.9), r"tp must be an integer, got 2.0"),
                       (([8], 0, 3.35, 0.9), r"gpu_mem_gib must be a finite number in \(0, 1.04858e\+06\], got 0.0"),
                       (([8], 80, 0, 0.9), r"bandwidth_tbs must be a finite number in \(0, 1000\], got 0.0"),
                       (([8], 80, float("nan"), 0.9), r"bandwidth_tbs must be a finite number"),
                       (([8], 1e300, 3.35, 0.9), r"gpu_mem_gib must be a finite number"),
                       (([8], 80, 3.35, 1.5), r"gpu_memory_utilization must be a finite number in \(0, 1\]")]:
        with pytest.raises(ConfigError, match=f"^{says}"):
            plan_rows(cfg, *args)


def test_plan_notes_every_split_the_model_cannot_take():
    cfg = Step1Config.from_dict(config_dict(**{**CHAT_130B, "intermediate_size": 31236}))   # 31236 = 4 x 7809
    rows = {r["tp"]: r for r in plan_rows(cfg, [4, 8, 16], 80, 3.35, 0.9)}
    assert "weights_gib" in rows[4]
    assert rows[8]["note"] == "not possible: tensor_parallel_size 8 must divide the 31236 intermediate size"
    assert rows[16]["note"] == "not possible: tensor_parallel_size 16 must divide the 8 KV groups"


def test_fp8_rows_for_one_h200():
    """FP8 projections fit the 130B model on one H200 (139 GiB) with room for a KV cache; bf16 does
    not; a one-byte KV cache doubles the tokens that fit."""
    cfg = Step1Config.from_dict(config_dict(**CHAT_130B))
    rows = {r["format"]: r for r in plan_rows(cfg, [1], 139, 4.8, 0.97, ("bf16", "fp8", "fp8+kv8"))}
    assert "does not fit" in rows["bf16"]["note"]
    assert 10_000 < rows["fp8"]["kv_tokens"] and rows["fp8+kv8"]["kv_tokens"] in (
        2 * rows["fp8"]["kv_tokens"], 2 * rows["fp8"]["kv_tokens"] + 1)
    assert rows["fp8"]["floor_ms"] < 0.55 * rows["bf16"]["floor_ms"]
    with pytest.raises(ConfigError, match="format must be one of"):
        plan_rows(cfg, [1], 139, 4.8, 0.97, ("int4",))
