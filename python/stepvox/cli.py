"""The `stepvox` command.

  stepvox generate [--model DIR] [--prompt TEXT ...]   generate and report throughput
  stepvox plan --model DIR [--tp 1 2 4 8]              tensor-parallel memory/speed plan
Given no model folder, `generate` writes a tiny random-weight Step1 checkpoint and says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from stepvox.engine.sampling_params import SamplingParams
from stepvox.kernels import BACKENDS
from stepvox.llm import LLM
from stepvox.plan import main as plan_main
from stepvox.testing.step1 import write_random_step1


def _default_model(path: str | None) -> str:
    folder = path or os.path.join(tempfile.gettempdir(), "stepvox-tiny-step1")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        write_random_step1(folder, seed=0)
    print(f"no --model given: using a tiny random-weight Step1 checkpoint written to {folder} "
          f"(2 layers, hidden 64, real 74752-token vocabulary; its output is noise)")
    return folder


def cmd_generate(args) -> int:
    model = args.model or _default_model(None)
    t0 = time.perf_counter()
    llm = LLM(model, device=args.device, dtype=args.dtype, tensor_parallel_size=args.tp,
              max_model_len=args.max_model_len, enforce_eager=args.eager, kernel_backend=args.kernels)
    load_s = time.perf_counter() - t0
    prompts = args.prompt or ["Hello, how are you today?"]
    prompts = (prompts * args.batch)[:max(args.batch, len(prompts))]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params)
    gen_s = time.perf_counter() - t1
    eng = llm.engine
    for out in outs[:min(len(outs), 4)]:
        c = out.outputs[0]
        print(f"[{out.request_id}] prompt {len(out.prompt_token_ids)} tokens -> {len(c.token_ids)} tokens "
              f"({c.finish_reason})")
        print(f"  ids:  {c.token_ids[:32]}{' ...' if len(c.token_ids) > 32 else ''}")
        print(f"  text: {c.text[:200]!r}")
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs if o.metrics.first_token_time]
    print(f"device {eng.device} dtype {str(eng.dtype).replace('torch.', '')}; load {load_s:.2f} s; "
          f"KV cache {eng.block_manager.num_pages} pages of {eng.ecfg.page_size} tokens")
    print(f"{len(outs)} requests, {eng.stats['prefill_tokens']} prefill + {new_tokens} generated tokens in "
          f"{gen_s:.3f} s: {new_tokens / gen_s:.1f} generated tokens/s, "
          f"time to first token {1e3 * min(ttft):.1f}-{1e3 * max(ttft):.1f} ms, {eng.stats['steps']} steps")
    llm.shutdown()
    return 0


def cmd_plan(args) -> int:
    return plan_main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stepvox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="generate from a Step1 model folder")
    g.add_argument("--model", help="Step1 folder (config.json, safetensors, tokenizer.model)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--batch", type=int, default=1, help="number of requests (prompts repeated)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--kernels", choices=BACKENDS, default="auto",
                   help="kernel implementation: Triton on GPUs (auto), or force triton / reference")
    g.set_defaults(func=cmd_generate)
    p = sub.add_parser("plan", help="tensor-parallel plan: weights per rank, KV tokens, ms/token floor")
    p.add_argument("--model", help="model folder (its config.json); default: the 130B chat shape")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--bandwidth-tbs", type=float, default=3.35)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.set_defaults(func=cmd_plan)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "command", None):
        args = ap.parse_args(["generate"] + list(argv if argv is not None else sys.argv[1:]))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
