"""Tensor parallelism checked on one GPU: TP=2 and TP=4 with every rank on the one card
(`tensor_parallel_share_device`; gloo over host copies for the engine's other collectives, the custom
all-reduce of stepvox._C for the activations' sums, fused with the residual add and RMSNorm) against
TP=1, TTS-3B shape, random weights (load_format="dummy").

For each dtype: TP=1 decodes greedily from a few prompts; each TP engine is fed TP=1's tokens (a
logits processor records its logits, then forces TP=1's token), so logits are compared position by
position (relative L2 error, max abs error, argmax agreement), and its own free-running greedy tokens
are compared with TP=1's. Ranks time-share the card: this checks results, not speed.

    python bench/tp_one_gpu.py                  # on the GPU; stepvox._C built for the custom rows
    python bench/tp_one_gpu.py --tokens 16 --dtypes float32
JSON to $OUT/tp_one_gpu.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from _util import device_name, print_table, write_json

from stepvox import LLM, SamplingParams
from stepvox.engine.config import TTS_3B
from stepvox.engine.distributed import custom_all_reduce as car
from stepvox.testing.logits import LogitsRecorder

from fp8 import bare_folder  # noqa: E402  (bench/fp8.py: config.json + tokenizer for load_format="dummy")

PROMPTS = [[1, 5, 300, 4000, 65600, 66000, 70000, 12], [1] + list(range(100, 164))]
# (name, engine options): TP=1 is the reference
VARIANTS = [("tp1", dict(tensor_parallel_size=1)),
            ("tp2", dict(tensor_parallel_size=2, tensor_parallel_share_device=True)),
            ("tp2+car", dict(tensor_parallel_size=2, tensor_parallel_share_device=True, custom_all_reduce=True)),
            ("tp4+car", dict(tensor_parallel_size=4, tensor_parallel_share_device=True, custom_all_reduce=True))]


def engine(folder: str, dtype: str, opts: dict) -> LLM:
    # every engine eager: ranks sharing a card run so anyway, and TP=1 then runs the same kernels
    return LLM(folder, load_format="dummy", dtype=dtype, max_model_len=1024, num_kv_pages=256,
               max_num_seqs=8, enforce_eager=True, **opts)


def compare(folder: str, dtype: str, tokens: int, variants) -> list[dict]:
    params = dict(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    ref = engine(folder, dtype, dict(tensor_parallel_size=1))
    try:
        greedy = [ref.generate([p], SamplingParams(**params))[0].outputs[0].token_ids for p in PROMPTS]
        ref_logits = []
        for p, g in zip(PROMPTS, greedy):
            rec = LogitsRecorder(g)
            ref.generate([p], SamplingParams(**params, logits_processors=[rec]))
            ref_logits.append(torch.stack(rec.rows))
    finally:
        ref.shutdown()
    rows = []
    for name, opts in variants:
        if name == "tp1":
            continue
        llm = engine(folder, dtype, opts)
        try:
            fused = llm.engine.executor._group.custom is not None
            for p, g, a in zip(PROMPTS, greedy, ref_logits):
                own = llm.generate([p], SamplingParams(**params))[0].outputs[0].token_ids
                rec = LogitsRecorder(g)
                llm.generate([p], SamplingParams(**params, logits_processors=[rec]))
                b = torch.stack(rec.rows)
                rel = (b - a).norm(dim=1) / a.norm(dim=1)
                first_diff = next((i for i, (x, y) in enumerate(zip(own, g)) if x != y), None)
                rows.append(dict(dtype=dtype, variant=name, custom_all_reduce=fused, prompt_tokens=len(p),
                                 positions=len(g), tokens_equal=own == g, first_divergence=first_diff,
                                 logits_rel_err_max=float(rel.max()), logits_abs_err_max=float((b - a).abs().max()),
                                 argmax_agreement=float((b.argmax(1) == torch.tensor(g)).float().mean())))
                print(rows[-1], flush=True)
        finally:
            llm.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--variants", default=",".join(name for name, _ in VARIANTS[1:]))
    args = ap.parse_args()
    built = car.load() is None
    chosen = args.variants.split(",")
    variants = [v for v in VARIANTS if v[0] in chosen and (built or not v[1].get("custom_all_reduce"))]
    res = {"device": device_name(), "torch": torch.__version__, "extension_built": built, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = bare_folder(os.path.join(tmp, "tts3b"), TTS_3B)
        for dtype in args.dtypes.split(","):
            res["rows"] += compare(folder, dtype, args.tokens, variants)
            write_json("tp_one_gpu.json", res)
    print_table(res["rows"], ["dtype", "variant", "custom_all_reduce", "prompt_tokens", "tokens_equal",
                              "first_divergence", "logits_rel_err_max", "argmax_agreement"])


if __name__ == "__main__":
    main()
