"""The engine's sampler on one GPU, Step1 vocabulary (74,752): the Triton top-k path
(kernels/sampling.py) against the torch path, TTS settings (temperature 0.7, top-k 50, the
repetition rule), batch 1 and 16: device time per call, and the fused path's draws against the
exact top-k softmax (total variation over 16,384 seeded draws of one row) and exact checks
against the formula with given uniforms. JSON to $OUT/sampling.json.

  python bench/sampling.py
"""
from __future__ import annotations

import torch

from _util import bench_gpu, device_name, print_table, write_json

from stepvox import SamplingParams
from stepvox.engine.sampler import Sampler
from stepvox.engine.sequence import Sequence
from stepvox.kernels.sampling import sample_top_k, sample_top_k_reference

VOCAB = 74752
TTS = dict(temperature=0.7, top_k=50, repetition_aware=True)


def _seqs(n: int, **params) -> list[Sequence]:
    out = []
    for i in range(n):
        s = Sequence(str(i), [1, 2, 3], SamplingParams(**params))
        s.token_ids += [70000 + i, 70100 + i]
        out.append(s)
    return out


def distribution_check(draws: int = 16384) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    row = torch.randn(VOCAB, device="cuda", generator=gen) * 3
    logits = row.bfloat16()[None].expand(draws, VOCAB)
    temps = torch.full((draws,), 0.7, device="cuda")
    ks = torch.full((draws,), 50, device="cuda", dtype=torch.int64)
    seeds = torch.randint(0, 2 ** 62, (draws,), device="cuda", generator=gen)
    got = sample_top_k(logits, temps, ks, seeds)
    scaled = logits[0].float() / 0.7
    kth = scaled.topk(50).values[-1]
    kept = scaled >= kth                     # ties at the k-th value stay in (bf16 logits have many)
    want = torch.where(kept, scaled, torch.tensor(float("-inf"), device="cuda")).softmax(-1)
    freq = torch.bincount(got, minlength=VOCAB).float() / draws
    outside = (freq[want == 0]).sum().item()
    tv = 0.5 * (freq - want).abs().sum().item()
    # exact agreement with the formula when both get the same uniforms
    u = torch.rand(8, VOCAB, device="cuda", generator=gen)
    lg = torch.randn(8, VOCAB, device="cuda", generator=gen).bfloat16()
    t8 = torch.tensor([0.7, 1.0, 0.0, 0.5, 0.7, 2.0, 0.0, 0.9], device="cuda")
    k8 = torch.tensor([50, 1, 9, 64, 2, 10, 1, 33], device="cuda")
    exact = torch.equal(sample_top_k(lg, t8, k8, torch.zeros(8, dtype=torch.long, device="cuda"), uniforms=u),
                        sample_top_k_reference(lg, t8, k8, u))
    return dict(total_variation=tv, mass_outside_top_k=outside, kept_tokens=int(kept.sum()),
                exact_with_given_uniforms=exact,
                ok=exact and outside == 0 and tv < 0.05)


def time_sampler(batch: int, fused: bool) -> float:
    sampler = Sampler(torch.device("cuda"), eos_token_id=3, fused=fused)
    logits = torch.randn(batch, VOCAB, device="cuda").bfloat16()
    seqs = _seqs(batch, **TTS)
    return bench_gpu(lambda: sampler.sample(logits, seqs)) * 1e3


def main():
    results = {"device": device_name()}
    results["check"] = check = distribution_check()
    print("check:", check, flush=True)
    rows = []
    for batch in (1, 16):
        fused, plain = time_sampler(batch, True), time_sampler(batch, False)
        rows.append(dict(batch=batch, triton_us=f"{fused:.1f}", torch_us=f"{plain:.1f}",
                         speedup=f"{plain / fused:.1f}x"))
        print(rows[-1], flush=True)
    results["rows"] = rows
    write_json("sampling.json", results)
    print(f"\ndevice: {results['device']}; draws vs exact top-k softmax: TV {check['total_variation']:.4f}, "
          f"exact with given uniforms: {check['exact_with_given_uniforms']}")
    print_table(rows, ["batch", "triton_us", "torch_us", "speedup"])


if __name__ == "__main__":
    main()
