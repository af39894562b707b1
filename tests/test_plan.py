"""`stepvox plan` (python/stepvox/plan.py): weights per rank, KV tokens that fit and the decode floor
for each tensor-parallel degree of the 130B chat model."""
from stepvox.engine.config import CHAT_130B, Step1Config
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
