"""FP8 weights (W8A16) against bf16 on one GPU, random weights (load_format="dummy": nothing on disk).

1. Accuracy, TTS-3B shape: the bf16 engine decodes 256 tokens greedily from a few prompts; the FP8
   engine (the same weights quantized while loading) is fed the same tokens (a logits processor
   records its logits, then forces bf16's token), so both are compared position by position:
   relative L2 error of the logits, and how often FP8's argmax is bf16's token (greedy agreement).
2. Decode ms/token, TTS-3B shape, batch 1 and 16, bf16 and FP8 (CUDA graphs, 256 tokens after a
   warm-up request; ms from the first token to the last).
3. The 130B chat shape with FP8 weights on one GPU (needs about 130 GiB: an H200): load time,
   decode ms/token at batch 1 and 16 against the floor (weight bytes / this card's measured
   device-to-device copy bandwidth, same run), prefill tokens/s at a 2048-token prompt, KV tokens.

JSON to $OUT/fp8.json; a table last.

    python bench/fp8.py                      # on the GPU
    python bench/fp8.py --sections accuracy,decode
    python bench/fp8.py --smoke              # tiny shape on the CPU (checks the script, no figures)
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from _util import device_name, guarded, print_table, write_json  # noqa: E402

from stepvox import LLM, SamplingParams  # noqa: E402
from stepvox.engine.config import CHAT_130B, TINY, TTS_3B, Step1Config  # noqa: E402
from stepvox.plan import rank_weight_bytes  # noqa: E402
from stepvox.testing.step1 import build_tokenizer_model, config_dict  # noqa: E402

PROMPTS = [[1, 5, 300, 4000, 65600, 66000, 70000, 12], [1, 9, 9, 9, 77, 65601, 65602, 65603, 3, 40],
           [1] + list(range(100, 164))]


def bare_folder(root: str, shape: dict) -> str:
    """config.json and a tokenizer: all that load_format="dummy" reads."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config_dict(**shape), f)
    build_tokenizer_model(os.path.join(root, "tokenizer.model"), shape["vocab_size"])
    return root


def engine(folder: str, smoke: bool, **opts) -> LLM:
    base = (dict(device="cpu", kernel_backend="triton", max_model_len=512, num_kv_pages=128) if smoke
            else dict(gpu_memory_utilization=0.9, max_model_len=4096))
    return LLM(folder, load_format="dummy", **{**base, **opts})


class Recorder:
    """Records each step's logits (float32, on the host), then forces the next token of `script`."""

    def __init__(self, script: list[int]):
        self.script, self.logits = script, []

    def __call__(self, output_ids, row):
        self.logits.append(row.detach().float().cpu().clone())       # the engine writes the row back in place
        forced = torch.full_like(row, float("-inf"))
        forced[self.script[min(len(output_ids), len(self.script) - 1)]] = 0.0
        return forced


def run_accuracy(folder: str, args, res: dict) -> None:
    n = 16 if args.smoke else 256
    rows = []
    bf = engine(folder, args.smoke)
    try:
        refs = []
        for prompt in PROMPTS:
            out = bf.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
            refs.append(out.outputs[0].token_ids)
            rec = Recorder(refs[-1])                 # bf16's logits along its own greedy tokens
            bf.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                 logits_processors=[rec]))
            rows.append({"prompt_tokens": len(prompt), "bf16": rec.logits})
    finally:
        bf.shutdown()
    q = engine(folder, args.smoke, quantization="fp8")
    try:
        for prompt, ref, row in zip(PROMPTS, refs, rows):
            rec = Recorder(ref)
            q.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                logits_processors=[rec]))
            a, b = torch.stack(row.pop("bf16")), torch.stack(rec.logits)
            finite = torch.isfinite(a) & torch.isfinite(b)           # ids the engine masks come as -inf
            a0, b0 = a.where(finite, 0.0), b.where(finite, 0.0)
            rel = (b0 - a0).norm(dim=1) / a0.norm(dim=1)
            row.update(positions=len(ref), logits_rel_err_median=float(rel.median()), logits_rel_err_max=float(rel.max()),
                       greedy_agreement=float((b.argmax(1) == torch.tensor(ref)).float().mean()),
                       bf16_self_agreement=float((a.argmax(1) == torch.tensor(ref)).float().mean()))
    finally:
        q.shutdown()
    res["accuracy"] = rows
    for r in rows:
        print(f"accuracy: {r}", flush=True)


def decode_ms(llm: LLM, batch: int, n: int, prompt_len: int = 32) -> float:
    prompts = [[1] + [(7 * i + j) % 60000 + 10 for j in range(prompt_len - 1)] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))     # warm-up
    outs = llm.generate(prompts, params)
    m = [(o.metrics.finished_time - o.metrics.first_token_time) / (n - 1) * 1e3 for o in outs]
    return max(m)


def run_decode(folder: str, args, res: dict) -> None:
    n = 8 if args.smoke else 256
    rows = []
    for quant in (None, "fp8"):
        llm = engine(folder, args.smoke, quantization=quant)
        try:
            row = {"weights": quant or "bf16"}
            for batch in (1, 16):
                row[f"batch{batch}_ms_per_token"] = round(decode_ms(llm, batch, n), 3)
            rows.append(row)
            print(f"decode: {row}", flush=True)
        finally:
            llm.shutdown()
    if len(rows) == 2:
        rows.append({"weights": "bf16 / fp8", **{k: round(rows[0][k] / rows[1][k], 2) for k in rows[0] if k != "weights"}})
    res["decode"] = rows


def copy_bandwidth_gbs(device: str) -> float:
    """Device-to-device copy of 4 GiB (read + write counted), median of 5."""
    src = torch.empty(1 << 31, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * (1 << 32) / sorted(times[1:])[2] / 1e9


def run_130b(root: str, args, res: dict) -> None:
    shape = dict(TINY) if args.smoke else dict(CHAT_130B)
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    need = rank_weight_bytes(Step1Config.from_dict(config_dict(**shape)), 1, "fp8")
    if not args.smoke and free < need + (8 << 30):
        raise RuntimeError(f"the 130B shape in FP8 needs {need / 2**30:.1f} GiB of weights; this GPU has "
                           f"{free / 2**30:.1f} GiB free")
    out = {"weight_bytes": need}
    if not args.smoke:
        out["copy_bandwidth_gbs"] = copy_bandwidth_gbs("cuda")
    folder = bare_folder(os.path.join(root, "chat-130b"), shape)
    t0 = time.perf_counter()
    llm = engine(folder, args.smoke, quantization="fp8", gpu_memory_utilization=0.97, cuda_graph_max_batch=16,
                 max_num_seqs=16) if not args.smoke else engine(folder, True, quantization="fp8")
    out["load_s"] = time.perf_counter() - t0
    try:
        runner = llm.engine.executor.runner
        out["kv_tokens"] = runner.num_pages * runner.page_size
        n = 8 if args.smoke else 128
        for batch in (1, 16):
            out[f"batch{batch}_ms_per_token"] = decode_ms(llm, batch, n)
        if "copy_bandwidth_gbs" in out:
            out["floor_ms"] = need / (out["copy_bandwidth_gbs"] * 1e9) * 1e3
            out["batch1_over_floor"] = out["batch1_ms_per_token"] / out["floor_ms"]
        plen = 64 if args.smoke else 2048
        prompt = [1] + [(13 * j) % 60000 + 10 for j in range(plen - 1)]
        llm.generate([prompt[:256]], SamplingParams(temperature=0.0, max_tokens=1))                  # warm-up
        t0 = time.perf_counter()
        o = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))[0]
        out["prefill_tokens_per_s"] = plen / (o.metrics.first_token_time - o.metrics.arrival_time)
        out["prefill_wall_s"] = time.perf_counter() - t0
    finally:
        llm.shutdown()
    res["chat_130b_fp8"] = out
    print(f"130B FP8: {out}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sections", default="accuracy,decode,130b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.out:
        os.environ["OUT"] = args.out
    args.smoke = args.smoke or not torch.cuda.is_available()
    res = dict(device=device_name() if not args.smoke else "cpu", torch=torch.__version__, smoke=args.smoke,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))
    root = tempfile.mkdtemp(prefix="stepvox-bench-fp8-")
    folder = bare_folder(os.path.join(root, "tts-3b"), TINY if args.smoke else TTS_3B)
    sections = args.sections.split(",")
    try:
        if "accuracy" in sections:
            guarded(res, "accuracy", lambda: run_accuracy(folder, args, res))
        if "decode" in sections:
            guarded(res, "decode", lambda: run_decode(folder, args, res))
        if "130b" in sections:
            guarded(res, "130b", lambda: run_130b(root, args, res))
    finally:
        path = write_json("fp8.json", res)
        print(f"\nFP8 vs bf16 on {res['device']}; JSON: {path}")
        if res.get("errors"):
            print("FAILED SECTIONS:", {k: str(v)[:300] for k, v in res["errors"].items()})
        if res.get("accuracy"):
            print_table([{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in res["accuracy"]],
                        ["prompt_tokens", "positions", "logits_rel_err_median", "logits_rel_err_max", "greedy_agreement",
                         "bf16_self_agreement"])
        if res.get("decode"):
            print_table(res["decode"], ["weights", "batch1_ms_per_token", "batch16_ms_per_token"])
        if res.get("chat_130b_fp8"):
            print_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in res["chat_130b_fp8"].items()}],
                        list(res["chat_130b_fp8"]))


if __name__ == "__main__":
    main()
