"""FP8 weights (W8A16) and the FP8 KV cache against bf16 on one GPU, random weights
(load_format="dummy": nothing on disk).

1. Accuracy, TTS-3B shape: the bf16 engine decodes 256 tokens greedily from a few prompts; the FP8
   engines (the same weights quantized while loading; then also the FP8 KV cache) are fed the same
   tokens (a logits processor records their logits, then forces bf16's token), so each is compared
   with bf16 position by position: relative L2 error of the logits, and how often its argmax is
   bf16's token (greedy agreement).
2. TTS-3B shape, bf16 / FP8 weights / FP8 weights + KV: decode ms/token at batch 1 and 16 (CUDA
   graphs, 256 tokens after a warm-up request; ms from the first token to the last) and prefill
   tokens/s of a 2048-token prompt (the FP8 GEMM).
0. Kernel: the FP8 prefill GEMM (kernels/gemm_fp8.py) against cuBLAS bf16 and against dequantizing
   then cuBLAS, on the projections of both shapes at 2048 rows (triton.testing.do_bench medians,
   warm L2; a second tile config beside the default); error against the float32-summed reference.
3. The 130B chat shape with FP8 weights and KV cache on one GPU (needs about 130 GiB: an H200):
   load time, decode ms/token at batch 1 and 16 against the floor (weight bytes / this card's
   measured device-to-device copy bandwidth, same run), prefill tokens/s at a 2048-token prompt,
   KV tokens.

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
import gc  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402
from _util import device_name, guarded, print_table, write_json  # noqa: E402

from stepvox import LLM, SamplingParams  # noqa: E402
from stepvox.engine.config import CHAT_130B, TINY, TTS_3B, Step1Config  # noqa: E402
from stepvox.kernel_bench import copy_bandwidth_gbs  # noqa: E402
from stepvox.kernels.fp8 import dequantize_rows, quantize_rows  # noqa: E402
from stepvox.kernels.gemm_fp8 import gemm_fp8_config, linear_fp8, linear_fp8_reference  # noqa: E402
from stepvox.plan import rank_weight_bytes  # noqa: E402
from stepvox.testing.logits import LogitsRecorder  # noqa: E402
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


def run_accuracy(folder: str, args, res: dict) -> None:
    n = 16 if args.smoke else 256
    rows = []
    bf = engine(folder, args.smoke)
    try:
        refs = []
        for prompt in PROMPTS:
            out = bf.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
            refs.append(out.outputs[0].token_ids)
            rec = LogitsRecorder(refs[-1])                 # bf16's logits along its own greedy tokens
            bf.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                 logits_processors=[rec]))
            rows.append({"prompt_tokens": len(prompt), "bf16": rec.rows})
    finally:
        bf.shutdown()
    out = []
    for name, opts in FORMATS[1:]:
        q = engine(folder, args.smoke, **opts)
        try:
            for prompt, ref, row in zip(PROMPTS, refs, rows):
                rec = LogitsRecorder(ref)
                q.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                    logits_processors=[rec]))
                a, b = torch.stack(row["bf16"]), torch.stack(rec.rows)
                finite = torch.isfinite(a) & torch.isfinite(b)           # ids the engine masks come as -inf
                a0, b0 = a.where(finite, 0.0), b.where(finite, 0.0)
                rel = (b0 - a0).norm(dim=1) / a0.norm(dim=1)
                out.append(dict(format=name, prompt_tokens=row["prompt_tokens"], positions=len(ref),
                                logits_rel_err_median=float(rel.median()), logits_rel_err_max=float(rel.max()),
                                greedy_agreement=float((b.argmax(1) == torch.tensor(ref)).float().mean()),
                                bf16_self_agreement=float((a.argmax(1) == torch.tensor(ref)).float().mean())))
                print(f"accuracy: {out[-1]}", flush=True)
        finally:
            q.shutdown()
    res["accuracy"] = out


FORMATS = [("bf16", {}), ("fp8", dict(quantization="fp8")),
           ("fp8+kv8", dict(quantization="fp8", kv_cache_dtype="fp8"))]


def decode_ms(llm: LLM, batch: int, n: int, prompt_len: int = 32) -> float:
    prompts = [[1] + [(7 * i + j) % 60000 + 10 for j in range(prompt_len - 1)] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))     # warm-up
    outs = llm.generate(prompts, params)
    m = [(o.metrics.finished_time - o.metrics.first_token_time) / (n - 1) * 1e3 for o in outs]
    return max(m)


def prefill_tokens_per_s(llm: LLM, length: int) -> float:
    """A `length`-token prompt's prefill (arrival to first token), after a shorter warm-up one."""
    prompt = [1] + [(13 * j) % 60000 + 10 for j in range(length - 1)]
    llm.generate([prompt[:256]], SamplingParams(temperature=0.0, max_tokens=1))
    prompt[1] += 1                                      # no prefix-cache hit on the warm-up's pages
    o = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))[0]
    return length / (o.metrics.first_token_time - o.metrics.arrival_time)


def run_decode(folder: str, args, res: dict) -> None:
    n = 8 if args.smoke else 256
    rows = []
    for name, opts in FORMATS:
        llm = engine(folder, args.smoke, **opts)
        try:
            row = {"format": name}
            for batch in (1, 16):
                row[f"batch{batch}_ms_per_token"] = round(decode_ms(llm, batch, n), 3)
            row["prefill_2048_tokens_per_s"] = round(prefill_tokens_per_s(llm, 64 if args.smoke else 2048), 1)
            rows.append(row)
            print(f"decode: {row}", flush=True)
        finally:
            llm.shutdown()
    for row in list(rows[1:]):                          # speed-ups: ms ratios bf16 / x, tokens/s ratios x / bf16
        rows.append({"format": f"{row['format']} speed-up",
                     **{k: round(rows[0][k] / row[k] if k.endswith("ms_per_token") else row[k] / rows[0][k], 2)
                        for k in row if k != "format"}})
    res["decode"] = rows


def run_gemm(args, res: dict) -> None:
    dev = "cpu" if args.smoke else "cuda"
    m = 64 if args.smoke else 2048
    alt = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    shapes = [(64, 64)]
    if not args.smoke:          # (N, K) of qkv, gate|up and down of each shape
        shapes = []
        for shape in (TTS_3B, CHAT_130B):
            c = Step1Config.from_dict(config_dict(**shape))
            h, kv, inter = c.hidden_size, c.kv_dim, c.intermediate_size
            shapes += [(h + 2 * kv, h), (2 * inter, h), (h, inter)]
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device=dev) * 0.02
        q, scale = quantize_rows(w)
        del w
        x = torch.randn(m, k, device=dev).to(torch.bfloat16 if not args.smoke else torch.float32)
        wd = dequantize_rows(q, scale, x.dtype)
        ref = linear_fp8_reference(x, q, scale).float()
        err = float((linear_fp8(x, q, scale).float() - ref).abs().max() / ref.abs().max())
        row = dict(m=m, n=n, k=k, rel_err=err)
        if not args.smoke:
            row["cublas_bf16_us"] = triton.testing.do_bench(lambda: F.linear(x, wd), return_mode="median") * 1e3
            row["fp8_gemm_us"] = triton.testing.do_bench(lambda: linear_fp8(x, q, scale), return_mode="median") * 1e3
            row["fp8_alt_tiles_us"] = triton.testing.do_bench(lambda: linear_fp8(x, q, scale, config=alt),
                                                              return_mode="median") * 1e3
            row["dequantize_then_cublas_us"] = triton.testing.do_bench(
                lambda: F.linear(x, dequantize_rows(q, scale, x.dtype)), return_mode="median") * 1e3
            row["fp8_tflops"] = 2 * m * n * k / row["fp8_gemm_us"] / 1e6
        rows.append(row)
        print(f"gemm: {row}", flush=True)
    res["gemm"] = dict(default_config=gemm_fp8_config(m, torch.bfloat16, args.smoke), alt_config=alt, rows=rows)


def run_130b(root: str, args, res: dict) -> None:
    shape = dict(TINY) if args.smoke else dict(CHAT_130B)
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    need = rank_weight_bytes(Step1Config.from_dict(config_dict(**shape)), 1, "fp8")
    if not args.smoke and free < need + (8 << 30):
        raise RuntimeError(f"the 130B shape in FP8 needs {need / 2**30:.1f} GiB of weights; this GPU has "
                           f"{free / 2**30:.1f} GiB free")
    out = {"weight_bytes": need}
    if not args.smoke:
        out["copy_bandwidth_gbs"] = copy_bandwidth_gbs(torch.device("cuda"))
    folder = bare_folder(os.path.join(root, "chat-130b"), shape)
    t0 = time.perf_counter()
    fp8 = dict(quantization="fp8", kv_cache_dtype="fp8")
    llm = engine(folder, args.smoke, **fp8, gpu_memory_utilization=0.97, cuda_graph_max_batch=16,
                 max_num_seqs=16) if not args.smoke else engine(folder, True, **fp8)
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
        out["prefill_tokens_per_s"] = prefill_tokens_per_s(llm, 64 if args.smoke else 2048)
    finally:
        llm.shutdown()
    res["chat_130b_fp8"] = out
    print(f"130B FP8: {out}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sections", default="gemm,accuracy,decode,130b")
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
    unknown = set(sections) - {"gemm", "accuracy", "decode", "130b"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from gemm, accuracy, decode, 130b")
    runs = dict(gemm=lambda: run_gemm(args, res), accuracy=lambda: run_accuracy(folder, args, res),
                decode=lambda: run_decode(folder, args, res), **{"130b": lambda: run_130b(root, args, res)})
    try:
        for name in sections:                    # in the order given
            guarded(res, name, runs[name])
            write_json("fp8.json", res)          # what is done survives a run stopped at its time limit
            gc.collect()                         # the section's engines are gone: give their memory back
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        path = write_json("fp8.json", res)
        print(f"\nFP8 vs bf16 on {res['device']}; JSON: {path}")
        if res.get("errors"):
            print("FAILED SECTIONS:", {k: str(v)[:300] for k, v in res["errors"].items()})
        if res.get("gemm"):
            print_table([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                         for r in res["gemm"]["rows"]], list(res["gemm"]["rows"][0]))
        if res.get("accuracy"):
            print_table([{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in res["accuracy"]],
                        ["format", "prompt_tokens", "positions", "logits_rel_err_median", "logits_rel_err_max",
                         "greedy_agreement", "bf16_self_agreement"])
        if res.get("decode"):
            print_table(res["decode"], ["format", "batch1_ms_per_token", "batch16_ms_per_token",
                                        "prefill_2048_tokens_per_s"])
        if res.get("chat_130b_fp8"):
            print_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in res["chat_130b_fp8"].items()}],
                        list(res["chat_130b_fp8"]))


if __name__ == "__main__":
    main()
