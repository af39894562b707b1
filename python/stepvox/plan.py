"""`stepvox plan`: for a Step1 config and a GPU, what each tensor-parallel degree costs and allows.

Per degree and weight format: weight bytes per rank (the embedding, LM head and every projection
split; norms replicated), KV-cache tokens that fit in what is left of the GPU, and the decode
ms/token floor at batch 1 (each rank streams its weights once per token at the given bandwidth).

Formats: bf16; "fp8" = the projections in FP8 with a float32 scale per output row (a row-parallel
rank keeps every row's scale), embedding and LM head bf16 (kernels/fp8.py, `quantization="fp8"`);
"fp8+kv8" = that plus a one-byte KV cache (`kv_cache_dtype="fp8"`).
"""
from __future__ import annotations

import json

from stepvox.engine import checks
from stepvox.engine.config import CHAT_130B, Step1Config
from stepvox.engine.errors import ConfigError

ACTIVATION_RESERVE_GIB = 4.0   # activations, CUDA graphs, NCCL buffers, allocator slack (per rank)
MAX_GPU_MEM_GIB = 1 << 20      # bounds that keep the arithmetic finite, far above any GPU
MAX_BANDWIDTH_TBS = 1e3


FORMATS = ("bf16", "fp8", "fp8+kv8")


def rank_weight_bytes(cfg: Step1Config, tp: int, fmt: str = "bf16") -> int:
    h, kv, inter, vocab, layers = (cfg.hidden_size, cfg.kv_dim, cfg.intermediate_size, cfg.vocab_size,
                                   cfg.num_hidden_layers)
    projections = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    embedding_and_head = 2 * vocab * h
    norms = layers * 2 * h + h
    if fmt == "bf16":
        return (projections + embedding_and_head) // tp * 2 + norms * 2
    # scales: column-parallel rows (q, k, v, gate, up) split, row-parallel rows (o, down) on every rank
    scales = layers * ((h + 2 * kv + 2 * inter) // tp + 2 * h) * 4
    return projections // tp + scales + embedding_and_head // tp * 2 + norms * 2


def kv_bytes_per_token(cfg: Step1Config, tp: int, fmt: str = "bf16") -> int:
    elem = 1 if fmt == "fp8+kv8" else 2
    return cfg.num_hidden_layers * 2 * (cfg.num_attention_groups // tp) * cfg.head_dim * elem


def plan_rows(cfg: Step1Config, tps: list[int], gpu_mem_gib: float, bandwidth_tbs: float,
              utilization: float, formats: tuple[str, ...] = ("bf16",)) -> list[dict]:
    """One row per degree in `tps` and format in `formats`; ConfigError naming any argument out of range."""
    for fmt in formats:
        checks.one_of(fmt, "format", ConfigError, FORMATS)
    tps = [checks.integer(tp, "tp", ConfigError, 1) for tp in tps]
    gpu_mem_gib = checks.real(gpu_mem_gib, "gpu_mem_gib", ConfigError, 0.0, MAX_GPU_MEM_GIB, lo_open=True)
    bandwidth_tbs = checks.real(bandwidth_tbs, "bandwidth_tbs", ConfigError, 0.0, MAX_BANDWIDTH_TBS, lo_open=True)
    utilization = checks.real(utilization, "gpu_memory_utilization", ConfigError, 0.0, 1.0, lo_open=True)
    rows = []
    for tp in tps:
        for fmt in formats:
            row = {"tp": tp, "format": fmt}
            problem = cfg.tp_problem(tp)
            if problem:
                row["note"] = f"not possible: {problem}"
                rows.append(row)
                continue
            weights = rank_weight_bytes(cfg, tp, fmt)
            room = gpu_mem_gib * 2**30 * utilization - weights - ACTIVATION_RESERVE_GIB * 2**30
            row.update(weights_gib=weights / 2**30,
                       kv_tokens=max(int(room // kv_bytes_per_token(cfg, tp, fmt)), 0),
                       floor_ms=weights / (bandwidth_tbs * 1e12) * 1e3)
            if room <= 0:
                row["note"] = f"does not fit: {weights / 2**30:.1f} GiB of weights per rank"
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| TP | format | weights per rank | KV tokens that fit | decode floor (batch 1) | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "weights_gib" in r:
            lines.append(f"| {r['tp']} | {r['format']} | {r['weights_gib']:.1f} GiB | {r['kv_tokens']:,} | "
                         f"{r['floor_ms']:.1f} ms/token | {r.get('note', '')} |")
        else:
            lines.append(f"| {r['tp']} | {r['format']} | - | - | - | {r['note']} |")
    return "\n".join(lines)


def main(args) -> int:
    cfg = Step1Config.from_folder(args.model) if args.model else Step1Config.from_shape(CHAT_130B)
    formats = tuple(args.formats) if getattr(args, "formats", None) else FORMATS
    rows = plan_rows(cfg, args.tp, args.gpu_mem_gib, args.bandwidth_tbs, args.gpu_memory_utilization, formats)
    total, total8 = rank_weight_bytes(cfg, 1), rank_weight_bytes(cfg, 1, "fp8")
    print(f"Step1 {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
          f"{cfg.num_attention_groups} KV groups: {total / 1e9:.1f} GB of bf16 weights ({total8 / 1e9:.1f} GB with "
          f"FP8 projections); GPU {args.gpu_mem_gib:g} GiB "
          f"at {args.bandwidth_tbs:g} TB/s, {args.gpu_memory_utilization:.0%} usable, "
          f"{ACTIVATION_RESERVE_GIB:g} GiB kept for activations")
    print(format_rows(rows))
    if getattr(args, "json", False):
        print(json.dumps(rows))
    return 0
