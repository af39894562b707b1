"""Speech decoder (flow matching + HiFT token2wav) benchmark on one GPU, random weights of the real config.

Checks correctness on the device first (bf16 fused/graph flow against the float32 eager reference
path, the two estimator paths against each other, graphs against the same bucketed inputs run
eagerly and against the unpadded eager path, HiFT graphs likewise, each Triton kernel against its
reference), then times with CUDA events (medians after warm-up):
  flow only for 5 s and 10 s of audio (3 s speaker prompt): fused (channels-last row_conv path) and
  unfused (plain modules) with graphs, fused eager; the eager pre-solve alone; HiFT graphs / eager /
  reference Snake; offline token2wav end to end (RTF); streaming first-chunk latency (first window =
  35 tokens); 8 concurrent streams fed 5 tokens (120 ms) per tick; peak memory per section.
  Optional: `variants` (first chunk, its solve / pre-solve / HiFT and offline 10 s with PDL on and
  off), `ops` (each estimator op alone, row_conv tiles against the cuBLAS / cuDNN ops they replace)
  and `tune_short` (the first window's op shapes over candidate tiles; prints the best as code).
Every variant is its own decoder (the same weights, other settings); nothing is switched globally.
Targets: 10 s of audio in <= 50 ms end to end, first streamed chunk <= 30 ms.
A failing section is reported and the others still run. Rows print as they come, the table last;
JSON to $OUT/vocoder.json.

  python bench/vocoder.py                      # full run on CUDA (random weights of the released config)
  python bench/vocoder.py --model-dir DIR      # a real CosyVoice-300M-25Hz folder instead
  python bench/vocoder.py --sections ops       # per-op timings only
  python bench/vocoder.py --smoke              # tiny config on CPU, few reps: catches errors only
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _util import bench_graph, device_name, guarded, print_table, write_json
from torch.profiler import ProfilerActivity, profile

from stepvox.engine.audio.decoder import SpeakerPrompt, SpeechDecoder
from stepvox.engine.models.cosyvoice_config import config_from_data
from stepvox.engine.models.flow import FlowModel, FlowRequest
from stepvox.engine.models.hift import HiFTGenerator
from stepvox.engine.models.yaml_reader import parse_inert_yaml
from stepvox.kernels import KernelConfig
from stepvox.kernels.flow_attention import flow_attention
from stepvox.kernels.flow_conv import (LINEAR, UPSAMPLE_K4S2P1, conv_spec, conv_weight, linear_weight, row_conv,
                                       row_conv_reference, table_tiles, upsample_weight)
from stepvox.kernels.flow_fused import (add_layer_norm, add_layer_norm_reference, group_norm_mish,
                                        group_norm_mish_reference, group_norm_mish_rows,
                                        group_norm_mish_rows_reference)
from stepvox.kernels.flow_ode import cfg_euler_step, cfg_euler_step_reference
from stepvox.kernels.snake import snake, snake_reference
from stepvox.testing.cosyvoice import FULL_SIZES, TINY_SIZES, yaml_text   # the released config's text

TOKEN_RATE = 41.667
SR = 22050

# ----------------------------------------------------------------------------- setup
def random_decoder(sizes, device, kernels: KernelConfig, seed=0) -> SpeechDecoder:
    """Modules of the config with PyTorch's default init, plus what default init leaves empty."""
    cfg = config_from_data(parse_inert_yaml(yaml_text(sizes)))
    torch.manual_seed(seed)
    with torch.device(device):
        flow, hift = FlowModel(cfg.flow, kernels), HiFTGenerator(cfg.hift, kernels)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "pos_bias" in name:
                p.normal_(0, 0.1)
        hift.f0_predictor.classifier.bias.fill_(150.0)          # a voiced source, as in speech
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return SpeechDecoder(cfg, flow.to(dtype).eval(), hift.eval(), None, device, cuda_graphs=device.type == "cuda")


def rebuilt(dec: SpeechDecoder, kernels: KernelConfig, flow_dtype=None, cuda_graphs=None, fused=True) -> SpeechDecoder:
    """A decoder with `dec`'s weights (copied) whose modules run `kernels`; flow in `flow_dtype`."""
    with torch.device(dec.device):
        flow, hift = FlowModel(dec.config.flow, kernels), HiFTGenerator(dec.config.hift, kernels)
    flow.load_state_dict(dec.flow.state_dict())
    hift.load_state_dict(dec.hift.state_dict())
    flow = flow.to(flow_dtype or dec.flow.dtype).eval()
    graphs = dec.solver.use_cuda_graphs if cuda_graphs is None else cuda_graphs
    return SpeechDecoder(dec.config, flow, hift.eval(), None, dec.device, cuda_graphs=graphs, fused=fused)


def make_prompt(seconds: float, device, seed=1) -> SpeakerPrompt:
    g = torch.Generator().manual_seed(seed)
    frames = int(seconds * SR / 256)
    return SpeakerPrompt(mel=torch.randn(frames, 80, generator=g) * 2 - 5, embedding=torch.randn(192, generator=g),
                         tokens=torch.randint(0, 5120, (int(seconds * TOKEN_RATE),), generator=g))


def tokens_for(seconds: float, seed=2) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5120, (int(round(seconds * TOKEN_RATE)),), generator=g).tolist()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of fn(): CUDA events on the GPU (host overhead included, as a caller
    sees it), perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ----------------------------------------------------------------------------- sections
def check_kernels(device, res, rows):
    """Each fused kernel against its reference on decoder-sized shapes."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {}
    b, length = 2, 1120
    v = torch.randn(2 * b, 80, length, generator=g, device=device).to(dt)
    x = torch.randn(b, 80, length, generator=g, device=device).to(dt)
    m = torch.ones(b, 1, length, device=device, dtype=dt)
    m[1, :, 900:] = 0
    step = float(torch.tensor(0.0432, dtype=dt))
    out["ode_step_max_abs"] = (cfg_euler_step(v, x, m, step, 0.7).float()
                               - cfg_euler_step_reference(v, x, m, step, 0.7).float()).abs().max().item()
    h = torch.randn(4, 256, length, generator=g, device=device).to(dt)
    w, bi = torch.randn(256, device=device, dtype=dt), torch.randn(256, device=device, dtype=dt)
    mm = torch.ones(4, 1, length, device=device, dtype=dt)
    mm[2:, :, 1000:] = 0
    temb = torch.randn(256, device=device, dtype=dt)
    ref = group_norm_mish_reference(h, w, bi, 8, 1e-5, mm, temb)
    out["gn_mish_rel"] = rel_err(group_norm_mish(h, w, bi, 8, 1e-5, mm, temb), ref)
    xs = torch.randn(4, length, 256, generator=g, device=device).to(dt)
    rs = torch.randn(4, length, 256, generator=g, device=device).to(dt)
    y1, r1 = add_layer_norm(xs, rs, w, bi)
    y2, r2 = add_layer_norm_reference(xs, rs, w, bi, 1e-5)
    out["add_ln_rel"] = rel_err(y1, y2)
    out["add_ln_residual_equal"] = bool(torch.equal(r1, r2))
    s = torch.randn(1, 128, 64 * 400, generator=g, device=device) * 3
    a = torch.rand(128, generator=g, device=device) + 0.1
    out["snake_rel"] = rel_err(snake(s, a), snake_reference(s, a))
    sm = torch.ones(1, 1, s.shape[-1], device=device)
    sm[..., 20000:] = 0
    out["snake_masked_rel"] = rel_err(snake(s, a, sm), snake_reference(s, a, sm))
    out.update(check_row_conv(device, dt, g))
    ok = (out["ode_step_max_abs"] == 0.0 and out["gn_mish_rel"] < 1e-2 and out["add_ln_rel"] < 1e-2
          and out["add_ln_residual_equal"] and out["snake_rel"] < 1e-5 and out["snake_masked_rel"] < 1e-5
          and all(v < 1e-2 for k, v in out.items() if k.startswith(("row_conv", "flow_attention"))))
    out["ok"] = ok
    res["check_kernels"] = out
    rows.append(dict(section="check kernels", config="bf16 shapes", note=f"ok={ok} gn={out['gn_mish_rel']:.1e}"))


def check_row_conv(device, dt, g) -> dict:
    """flow_conv.row_conv (every fused option the estimator uses) and the channels-last GroupNorm
    against their references on estimator shapes (2 x 1120 frames, 256 channels)."""
    n, length, c = 2, 1120, 256

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    x = rnd(n, length, c)
    m = torch.ones(n, length, device=device, dtype=dt)
    m[1, 700:] = 0
    ln = (rnd(c), rnd(c), 1e-5)
    cases = {
        "row_conv_qkv_ln": (x, linear_weight(rnd(768, c, scale=c ** -0.5)), None, LINEAR, dict(ln=ln)),
        "row_conv_ff1_ln_gelu": (x, linear_weight(rnd(1024, c, scale=c ** -0.5)), rnd(1024), LINEAR,
                                 dict(ln=ln, gelu=True)),
        "row_conv_ff2_res_mask": (rnd(n, length, 1024), linear_weight(rnd(c, 1024, scale=1024 ** -0.5)), rnd(c),
                                  LINEAR, dict(residual=x, mask_out=m, mul_mask_out=True)),
        "row_conv_conv3_in320_cf": (rnd(n, 320, length).transpose(1, 2), conv_weight(rnd(c, 320, 3, scale=0.03)),
                                    rnd(c), conv_spec(3, 1, 1), dict(mask_in=m)),
        "row_conv_down": (x, conv_weight(rnd(c, c, 3, scale=0.03)), rnd(c), conv_spec(3, 2, 1), dict(mask_in=m)),
        "row_conv_up": (x[:, :560], upsample_weight(rnd(c, c, 4, scale=0.03)), rnd(c), UPSAMPLE_K4S2P1,
                        dict(mask_in=m[:, :560])),
    }
    out = {}
    for name, (xi, w, b, spec, kw) in cases.items():
        out[name] = rel_err(row_conv(xi, w, b, spec, **kw), row_conv_reference(xi, w, b, spec, **kw))
    w3, b3 = conv_weight(rnd(c, c, 3, scale=0.03)), rnd(c)
    h, st = row_conv(x, w3, b3, conv_spec(3, 1, 1), mask_in=m, mask_out=m, gn_groups=8)
    gw, gb, temb = rnd(c), rnd(c), rnd(c)
    out["row_conv_gn_rows"] = rel_err(group_norm_mish_rows(h, st, gw, gb, 1e-5, mask=m, temb=temb),
                                      group_norm_mish_rows_reference(h, gw, gb, 8, 1e-5, m, temb))
    # conv1 and res_conv in one product, statistics of the first half only
    w6, b6 = conv_weight(rnd(2 * c, c, 3, scale=0.03)), rnd(2 * c)
    both, st = row_conv(x, w6, b6, conv_spec(3, 1, 1), mask_in=m, mask_out=m, gn_groups=8, stats_channels=c)
    ref_both = row_conv_reference(x, w6, b6, conv_spec(3, 1, 1), mask_in=m)
    out["row_conv_gn_rows_half"] = rel_err(
        group_norm_mish_rows(both[:, :, :c], st, gw, gb, 1e-5, mask=m, residual=both[:, :, c:]),
        group_norm_mish_rows_reference(ref_both[:, :, :c], gw, gb, 8, 1e-5, m, None, ref_both[:, :, c:]))
    # estimator attention (8 heads x 64) on the fused q/k/v rows, against float64 on the same inputs
    for rows_n in (176, 1120):
        qkv = rnd(n, rows_n, 3 * 512)
        km = m[:, :rows_n].clone()
        km[1, rows_n * 2 // 3:] = 0
        got = flow_attention(qkv, 8, km)
        q, k, v = qkv.double().view(n, rows_n, 3, 8, 64).permute(2, 0, 3, 1, 4).unbind(0)
        bias = torch.zeros(n, 1, 1, rows_n, dtype=torch.float64, device=device).masked_fill(
            km[:, None, None, :] == 0, float("-inf"))
        ref = torch.softmax(q @ k.transpose(-1, -2) / 8 + bias, -1) @ v
        out[f"flow_attention_{rows_n}_rel"] = rel_err(got, ref.transpose(1, 2).reshape(n, rows_n, 512))
    return out


def check_model(dec, device, res, rows, prompt):
    """Flow paths against each other and against the float32 eager path, same noise."""
    toks = tokens_for(5.0)
    mel_len = dec.config.flow.mel_frames(len(toks)) + prompt.mel.shape[0]
    noise = torch.randn(80, mel_len, generator=torch.Generator().manual_seed(3)).to(device)
    out = {}
    fast = dec.token2mel(toks, prompt=prompt, noise=noise)
    eager_fused = dec.variant(cuda_graphs=False).token2mel(toks, prompt=prompt, noise=noise)
    # what the graphs replay, run eagerly
    eager_bucketed = dec.variant(cuda_graphs=False, bucket_eager=True).token2mel(toks, prompt=prompt, noise=noise)
    eager_unfused = dec.variant(cuda_graphs=False, fused=False).token2mel(toks, prompt=prompt, noise=noise)
    kernels = dec.flow.estimator.kernels
    ref = rebuilt(dec, kernels, torch.float32, cuda_graphs=False, fused=False)
    mel32 = ref.token2mel(toks, prompt=prompt, noise=noise)
    out["graphs_vs_eager_rel"] = rel_err(fast, eager_fused)
    out["graphs_vs_bucketed_eager_rel"] = rel_err(fast, eager_bucketed)
    out["fused_vs_unfused_rel"] = rel_err(eager_fused, eager_unfused)
    out["bf16_vs_fp32_rel"] = rel_err(fast, mel32)
    out["fp32_unfused_vs_fp32_fused_rel"] = rel_err(ref.variant(fused=True).token2mel(toks, prompt=prompt, noise=noise),
                                                    mel32)
    del ref
    wav = dec.mel2wav(mel32, seed=0)
    reference_snake = rebuilt(dec, KernelConfig(backend="reference", pdl=kernels.pdl))
    out["hift_fused_vs_unfused_rel"] = rel_err(wav, reference_snake.mel2wav(mel32, seed=0))
    del reference_snake
    eager = dec.variant(cuda_graphs=False)
    wav_eager = eager.mel2wav(mel32, seed=0)
    mel_short = mel32[:, :mel32.shape[1] - 7]                      # a length inside a bucket (padded)
    wav_short_eager = eager.mel2wav(mel_short, seed=0)
    out["hift_graph_vs_eager_rel"] = rel_err(wav, wav_eager)
    wav_short = dec.mel2wav(mel_short, seed=0)
    out["hift_graph_padded_vs_eager_rel"] = rel_err(wav_short, wav_short_eager)
    # the same bucketed forward run eagerly: isolates the graph from the (TF32 conv) rounding that
    # a different length brings
    t, hg = mel_short.shape[1], dec.hift_graphs
    n, tb = t * dec.samples_per_token_frame, hg.bucket_frames(t)
    st = dec.open_stream(None, 0)
    mel_b = torch.zeros(1, 80, tb, device=device)
    mel_b[0, :, :t] = mel_short
    noise_b = torch.zeros(1, dec.hift.harmonics, tb * dec.samples_per_token_frame, device=device)
    noise_b[0, :, :n] = st.source_tape.take(0, n)
    wav_b = dec.hift(mel_b, st.start_phase[None], noise_b, frames=torch.tensor([t], device=device))[0][0, :n]
    out["hift_graph_vs_bucketed_eager_rel"] = rel_err(wav_short, wav_b)
    out["hift_bucketed_vs_unpadded_eager_rel"] = rel_err(wav_b, wav_short_eager)
    out["hift_finite"] = bool(torch.isfinite(wav).all())
    dt = dec.flow.dtype
    tol = 0.08 if dt == torch.bfloat16 else 1e-4
    out["ok"] = (out["bf16_vs_fp32_rel"] < tol and out["fused_vs_unfused_rel"] < tol
                 and out["graphs_vs_eager_rel"] < tol
                 and out["fp32_unfused_vs_fp32_fused_rel"] < 1e-3 and out["hift_fused_vs_unfused_rel"] < 1e-4
                 and out["hift_graph_vs_bucketed_eager_rel"] < 1e-5
                 and out["hift_graph_vs_eager_rel"] < 2e-3 and out["hift_graph_padded_vs_eager_rel"] < 2e-3
                 and out["hift_finite"])
    res["check_model"] = out
    rows.append(dict(section="check model", config=str(dt).replace("torch.", ""),
                     note=f"ok={out['ok']} bf16/fp32={out['bf16_vs_fp32_rel']:.1e} "
                          f"fused/unfused={out['fused_vs_unfused_rel']:.1e} "
                          f"hift graph/eager={out['hift_graph_padded_vs_eager_rel']:.1e}"))


def time_offline(dec, device, res, rows, prompt, reps, seconds_list):
    out = {}
    graphs_on = device.type == "cuda"
    flows = {(True, True): dec, (False, True): dec.variant(fused=False), (True, False): dec.variant(cuda_graphs=False)}
    if not graphs_on:
        flows = {(True, False): dec}
    kernels = dec.flow.estimator.kernels
    reference_snake = rebuilt(dec, KernelConfig(backend="reference", pdl=kernels.pdl), cuda_graphs=False)
    hifts = {(True, True): dec, (True, False): dec.variant(cuda_graphs=False), (False, False): reference_snake}
    for seconds in seconds_list:
        toks = tokens_for(seconds)
        audio_s = dec.config.flow.mel_frames(len(toks)) * 256 / SR
        for (fused, graphs), d in flows.items():
            reset_peak(device)
            ms = timed(lambda: d.token2mel(toks, prompt=prompt, seed=0), device, reps if graphs else min(reps, 5))
            key = f"flow {seconds:g}s fused={int(fused)} graphs={int(graphs)}"
            out[key] = dict(ms=ms, peak_mb=peak_mb(device))
            rows.append(dict(section="flow", config=key[5:], ms=f"{ms:.2f}", rtf=f"{ms / 1e3 / audio_s:.4f}",
                             peak_mb=peak_mb(device)))
        mel = dec.token2mel(toks, prompt=prompt, seed=0)
        for (fused, graphs), d in hifts.items():
            if graphs and not graphs_on:
                continue
            reset_peak(device)
            ms = timed(lambda: d.mel2wav(mel, seed=0), device, reps)
            key = f"hift {seconds:g}s fused={int(fused)} graphs={int(graphs)}"
            out[key] = dict(ms=ms, peak_mb=peak_mb(device))
            rows.append(dict(section="hift", config=key[5:], ms=f"{ms:.2f}", rtf=f"{ms / 1e3 / audio_s:.4f}",
                             peak_mb=peak_mb(device)))
        reqs, _ = dec._requests([toks], [prompt], [0], [None])
        ms = timed(lambda: (dec.flow.encode(reqs), dec.flow.speaker_condition(torch.stack([r.speaker for r in reqs]))),
                   device, reps)
        out[f"flow pre-solve {seconds:g}s"] = dict(ms=ms)
        rows.append(dict(section="flow", config=f"{seconds:g}s encoder+regulator (eager)", ms=f"{ms:.2f}"))
        reset_peak(device)
        ms = timed(lambda: dec.token2wav(toks, prompt=prompt, seed=0), device, reps)
        out[f"token2wav {seconds:g}s"] = dict(ms=ms, rtf=ms / 1e3 / audio_s, audio_s=audio_s, peak_mb=peak_mb(device))
        rows.append(dict(section="token2wav", config=f"{seconds:g}s e2e", ms=f"{ms:.2f}",
                         rtf=f"{ms / 1e3 / audio_s:.4f}", peak_mb=peak_mb(device),
                         note=("target <= 50 ms" if seconds == 10 else "")))
    res["offline"] = out


def _run_stream(dec, device, prompt, toks, seed):
    """Feed 5 tokens per tick; returns (first-chunk step ms, per-step ms list, audio samples)."""
    st = dec.open_stream(prompt, seed=seed)
    first, steps, samples = None, [], 0
    for i in range(0, len(toks), 5):
        dec.push(st, toks[i:i + 5])
        sync(device)
        t0 = time.perf_counter()
        chunks = dec.step_streams([st])[0]
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        if chunks:
            steps.append(ms)
            samples += sum(c.numel() for c in chunks)
            if first is None:
                first = ms
    st.finish()
    samples += sum(c.numel() for c in dec.step_streams([st])[0])
    return first, steps, samples


OP_TILES = {
    "ln": [(64, 128, None, 4, 1), (128, 128, None, 8, 1), (64, 256, None, 8, 1), (32, 128, None, 4, 1)],
    "wide": [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 256, 64, 8, 3)],
    "narrow": [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
               (128, 64, 32, 4, 4)],
    "conv": [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3)],
}


def time_ops(device, res, rows):
    """Each estimator op alone (graph-replayed, us per call) for the sequence lengths of a 10 s
    decode (1120 / 560 frames) and of the first streamed window (352 / 176), Triton row_conv with
    the tables' tiles and several others (given as arguments) against the cuBLAS / cuDNN +
    elementwise ops it replaces."""
    dt, c = torch.bfloat16, 256
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    w_qkv, w1, b1 = rnd(768, c, scale=c ** -0.5), rnd(1024, c, scale=c ** -0.5), rnd(1024)
    wo, bo, w2, b2 = rnd(c, 512, scale=512 ** -0.5), rnd(c), rnd(c, 1024, scale=1024 ** -0.5), rnd(c)
    wc, bc = rnd(c, c, 3, scale=0.03), rnd(c)
    lnw, lnb, gw, gb = rnd(c), rnd(c), rnd(c), rnd(c)
    prep = {k: linear_weight(v) for k, v in (("qkv", w_qkv), ("ff1", w1), ("out", wo), ("ff2", w2))}
    prep["conv"] = conv_weight(wc)
    out = {}
    for length in (1120, 560, 352, 176):
        x, a, f = rnd(2, length, c), rnd(2, length, 512), rnd(2, length, 1024)
        xc = x.transpose(1, 2).contiguous()
        ln = (lnw, lnb, 1e-5)
        ops = {   # (tile kind, the fused op with given tiles, the library ops it replaces)
            "qkv": ("ln", lambda t: row_conv(x, prep["qkv"], None, LINEAR, ln=ln, tiles=t),
                    lambda: F.linear(F.layer_norm(x, (c,), lnw, lnb), w_qkv)),
            "ff1": ("ln", lambda t: row_conv(x, prep["ff1"], b1, LINEAR, ln=ln, gelu=True, tiles=t),
                    lambda: F.gelu(F.linear(x, w1, b1))),
            "out": ("narrow", lambda t: row_conv(a, prep["out"], bo, LINEAR, residual=x, tiles=t),
                    lambda: F.linear(a, wo, bo) + x),
            "ff2": ("narrow", lambda t: row_conv(f, prep["ff2"], b2, LINEAR, residual=x, tiles=t),
                    lambda: F.linear(f, w2, b2) + x),
            "conv+gn": ("conv", lambda t: group_norm_mish_rows(*row_conv(x, prep["conv"], bc, conv_spec(3, 1, 1),
                                                                         gn_groups=8, tiles=t), gw, gb),
                        lambda: group_norm_mish(F.conv1d(xc, wc, bc, padding=1), gw, gb, 8)),
        }
        for name, (kind, fused, eager) in ops.items():
            entry = {"torch": round(1e3 * bench_graph(eager), 2),
                     f"tables {table_tiles(kind, length)}": round(1e3 * bench_graph(lambda: fused(None)), 2)}
            for cfg in OP_TILES[kind]:
                try:
                    entry[str(cfg)] = round(1e3 * bench_graph(lambda cfg=cfg: fused(cfg)), 2)
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit is reported
                    entry[str(cfg)] = f"{type(exc).__name__}"
            out[f"{name} L={length}"] = entry
            best = min((v, k) for k, v in entry.items() if k != "torch" and isinstance(v, float))
            rows.append(dict(section="op us", config=f"{name} 2x{length}", ms=f"{best[0]:.1f}",
                             note=f"torch {entry['torch']:.1f} us; best tile {best[1]}; "
                                  + " ".join(f"{v}" for k, v in entry.items() if k != "torch")))
    res["ops"] = out


SHORT_TILES = {
    "ln": [(32, 128, None, 4, 1), (16, 128, None, 4, 1), (32, 64, None, 4, 1), (16, 64, None, 2, 1),
           (16, 256, None, 4, 1), (32, 32, None, 2, 1), (64, 64, None, 4, 1), (16, 32, None, 2, 1)],
    "narrow": [(64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 32, 64, 2, 3), (32, 32, 128, 4, 3),
               (16, 64, 128, 4, 3), (32, 64, 128, 4, 3), (16, 32, 128, 2, 3), (32, 32, 256, 4, 2),
               (64, 32, 128, 4, 3), (16, 64, 256, 4, 2), (16, 32, 256, 4, 2)],
    "conv": [(64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 32, 64, 2, 3), (32, 64, 128, 4, 3),
             (16, 64, 128, 4, 3), (64, 32, 64, 4, 3), (32, 32, 128, 4, 3), (16, 32, 128, 2, 3)],
}
SHORT_ATTENTION = [(32, 64, 4), (16, 64, 4), (16, 32, 2), (32, 32, 2), (32, 128, 4), (64, 64, 4), (16, 128, 4),
                   (32, 64, 2)]
SHORT_GN_ELEMENTS = [8192, 4096, 2048, 1024]


def tune_short(device, res, rows):
    """The first streamed window's op shapes (2 sequences x 176 and x 352 frames): every row_conv
    tile kind, the estimator attention and the GroupNorm apply over candidate tiles, each passed as
    an argument (graph-replayed, PDL on, us per call). Prints, per kind and length band, the
    candidate with the least summed time as code for flow_conv.TILES_SHORT,
    flow_attention.ATTENTION_TILES and flow_fused.GN_ROWS_ELEMENTS (below 512 rows)."""
    dt, c = torch.bfloat16, 256
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    w = dict(qkv=linear_weight(rnd(768, c, scale=c ** -0.5)), ff1=linear_weight(rnd(1024, c, scale=c ** -0.5)),
             out=linear_weight(rnd(c, 512, scale=512 ** -0.5)), ff2=linear_weight(rnd(c, 1024, scale=1024 ** -0.5)),
             conv=conv_weight(rnd(c, c, 3, scale=0.03)), conv_res=conv_weight(rnd(2 * c, c, 3, scale=0.03)))
    b1, bc, b2c = rnd(1024), rnd(c), rnd(2 * c)
    ln = (rnd(c), rnd(c), 1e-5)
    gw, gb, temb = rnd(c), rnd(c), rnd(2, c)
    out, chosen = {}, {"row_conv": {}, "attention": [], "gn": None}
    for length, band in ((176, 256), (352, 384)):
        x, a, f = rnd(2, length, c), rnd(2, length, 512), rnd(2, length, 1024)
        qkv = rnd(2, length, 3 * 512)
        m = torch.ones(2, length, device=device, dtype=dt)
        m[1, length - 20:] = 0
        ops = {"ln": {"qkv": lambda t: row_conv(x, w["qkv"], None, LINEAR, ln=ln, tiles=t),
                      "ff1": lambda t: row_conv(x, w["ff1"], b1, LINEAR, ln=ln, gelu=True, tiles=t)},
               "narrow": {"out": lambda t: row_conv(a, w["out"], bc, LINEAR, residual=x, tiles=t),
                          "ff2": lambda t: row_conv(f, w["ff2"], bc, LINEAR, residual=x, mask_out=m,
                                                    mul_mask_out=True, tiles=t)},
               "conv": {"conv3+stats": lambda t: row_conv(x, w["conv"], bc, conv_spec(3, 1, 1), mask_out=m,
                                                          gn_groups=8, tiles=t),
                        "conv1+res+stats": lambda t: row_conv(x, w["conv_res"], b2c, conv_spec(3, 1, 1), mask_in=m,
                                                              mask_out=m, gn_groups=8, stats_channels=c, tiles=t)}}
        for kind, named in ops.items():
            totals = {}
            for cfg in SHORT_TILES[kind]:
                try:
                    per = {name: 1e3 * bench_graph(lambda fn=fn, cfg=cfg: fn(cfg)) for name, fn in named.items()}
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit is reported
                    out[f"{kind} {cfg} L={length}"] = type(exc).__name__
                    continue
                totals[cfg] = sum(per.values())
                out[f"{kind} {cfg} L={length}"] = {k: round(v, 2) for k, v in per.items()}
            best = min(totals, key=totals.get)
            chosen["row_conv"].setdefault(kind, []).append((band, best))
            rows.append(dict(section="short op us", config=f"{kind} 2x{length}", ms=f"{totals[best]:.1f}",
                             note=f"first candidate {totals.get(SHORT_TILES[kind][0], float('nan')):.1f}; "
                                  f"best {best}"))
        att = {tile: 1e3 * bench_graph(lambda tile=tile: flow_attention(qkv, 8, m, tile=tile))
               for tile in SHORT_ATTENTION}
        best = min(att, key=att.get)
        chosen["attention"].append((band, best))
        out[f"attention L={length}"] = {str(k): round(v, 2) for k, v in att.items()}
        rows.append(dict(section="short op us", config=f"attention 2x{length}", ms=f"{att[best]:.1f}",
                         note=f"first candidate {att[SHORT_ATTENTION[0]]:.1f}; best {best}"))
        h, st = row_conv(x, w["conv"], bc, conv_spec(3, 1, 1), mask_out=m, gn_groups=8)
        gn = {elems: 1e3 * bench_graph(lambda elems=elems: group_norm_mish_rows(
            h, st, gw, gb, 1e-5, mask=m, temb=temb, block_elements=elems)) for elems in SHORT_GN_ELEMENTS}
        out[f"gn apply L={length}"] = {str(k): round(v, 2) for k, v in gn.items()}
        best = min(gn, key=gn.get)
        if length == 176:
            chosen["gn"] = best
        rows.append(dict(section="short op us", config=f"gn apply 2x{length}", ms=f"{gn[best]:.1f}",
                         note=f"8192 elements {gn[8192]:.1f}; best {best}"))
    res["tune_short"] = dict(ops=out, chosen={k: str(v) for k, v in chosen.items()})
    print("chosen short tiles:\n  TILES_SHORT =", chosen["row_conv"], "\n  ATTENTION_TILES =",
          chosen["attention"] + [(512, (32, 64, 4)), (None, (64, 64, 4))], "\n  GN_ROWS_ELEMENTS =", chosen["gn"],
          flush=True)


def time_stream(dec, device, res, rows, prompt, reps, seconds):
    toks = tokens_for(seconds, seed=5)
    _run_stream(dec, device, prompt, toks, seed=0)            # warm-up: captures the window buckets
    firsts, worst = [], []
    for r in range(reps):
        first, steps, samples = _run_stream(dec, device, prompt, toks, seed=r)
        firsts.append(first)
        worst.append(max(steps))
    out = dict(first_chunk_ms=statistics.median(firsts), worst_step_ms=statistics.median(worst),
               audio_s=samples / SR)
    res["stream"] = out
    rows.append(dict(section="stream", config="first chunk (35 tok)", ms=f"{out['first_chunk_ms']:.2f}",
                     note="target <= 30 ms"))
    rows.append(dict(section="stream", config=f"worst window, {seconds:g}s", ms=f"{out['worst_step_ms']:.2f}"))


# (label, PDL); the final code comes first and last so its two runs show the spread between repeats
VARIANTS = [("final: PDL", True), ("no PDL", False), ("final (repeat)", True)]


def _solve_kernels(dec, device, z, mu, spks, cond, mask) -> tuple[int, list]:
    """Device activities in one replay of the solve graph, and the top ones by time."""
    dec.solver.solve_padded(z, mu, spks, cond, mask, padded=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.solver.solve_padded(z, mu, spks, cond, mask, padded=True)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.self_device_time_total)
    top = [dict(name=e.key[:80], calls=e.count, us=round(e.self_device_time_total, 1)) for e in events[:14]]
    return int(sum(e.count for e in events)), top


def time_variants(dec, device, res, rows, prompt, reps):
    """First streamed chunk (35 tokens after a 3 s prompt), the first window's solve alone (its graph:
    batch 1, 352 frames, padded), the pre-solve and HiFT of that chunk, and offline 10 s, for each
    variant: a decoder with `dec`'s weights and the variant's kernel settings, all in this process."""
    toks = tokens_for(10.0, seed=5)
    toks10 = tokens_for(10.0)
    out = {}
    backend = dec.flow.estimator.kernels.backend
    for label, pdl in VARIANTS:
        d = rebuilt(dec, KernelConfig(backend=backend, pdl=pdl))
        _run_stream(d, device, prompt, toks, seed=0)                # captures this variant's graphs
        firsts = [_run_stream(d, device, prompt, toks, seed=r)[0] for r in range(reps)]
        st = d.open_stream(prompt, seed=0)
        d.push(st, toks[:35])
        w = st.pending_window()
        req = FlowRequest(**st.flow_inputs(w))
        frames = d.solver.bucket_length(req.total_frames)
        graphs = d.solver.graphs_on(device)
        mu, spks, mask = d.flow_prep.run([req], frames, graphs=graphs)
        z = torch.randn(1, 80, frames, device=device, dtype=mu.dtype)
        cond = torch.zeros_like(z)
        solve_ms = timed(lambda: d.solver.solve_padded(z, mu, spks, cond, mask, padded=True), device, 20)
        prep_ms = timed(lambda: d.flow_prep.run([req], frames, graphs=graphs), device, 20)
        piece = d.config.flow.mel_frames(w.end - 20)
        hin = st.hift_inputs(torch.zeros(80, piece, device=device))
        hift_ms = timed(lambda: d._run_hift(hin["mel"][None], hin["start_phase"][None], hin["noise"][None]),
                        device, 20)
        kernels, top = _solve_kernels(d, device, z, mu, spks, cond, mask) if device.type == "cuda" else (None, [])
        if label == VARIANTS[0][0]:
            print(f"   top device activities of one first-window solve ({label}):")
            for t in top:
                print(f"     {t['us']:9.1f} us {t['calls']:5d}x  {t['name']}")
        offline_ms = timed(lambda: d.token2wav(toks10, prompt=prompt, seed=0), device, reps)
        r = dict(first_chunk_ms=statistics.median(firsts), first_chunk_all=firsts, solve_ms=solve_ms,
                 pre_solve_ms=prep_ms, hift_ms=hift_ms, kernels_per_solve=kernels, offline_10s_ms=offline_ms,
                 frames=frames, top=top)
        out[label] = r
        rows.append(dict(section="variant", config=label, ms=f"{r['first_chunk_ms']:.2f}",
                         note=f"solve {solve_ms:.2f} / pre {prep_ms:.2f} / hift {hift_ms:.2f} ms, "
                              f"{kernels} kernels/solve, 10 s offline {offline_ms:.1f} ms"))
        del d
    res.setdefault("variants", {}).update(out)


def time_concurrent(dec, device, res, rows, prompt, n_streams, seconds):
    toks = [tokens_for(seconds, seed=10 + i) for i in range(n_streams)]

    def run(seed0):
        streams = [dec.open_stream(prompt, seed=seed0 + i) for i in range(n_streams)]
        sync(device)
        t_start = time.perf_counter()
        first, ticks, samples = None, [], 0
        for i in range(0, len(toks[0]), 5):
            for st, t in zip(streams, toks):
                dec.push(st, t[i:i + 5])
            t0 = time.perf_counter()
            outs = dec.step_streams(streams)
            sync(device)
            ms = (time.perf_counter() - t0) * 1e3
            n = sum(c.numel() for o in outs for c in o)
            if n:
                ticks.append(ms)
                samples += n
                if first is None:
                    first = ms
        for st in streams:
            st.finish()
        samples += sum(c.numel() for o in dec.step_streams(streams) for c in o)
        sync(device)
        return first, ticks, samples, (time.perf_counter() - t_start) * 1e3

    run(100)                                               # warm-up (graphs for batch n_streams)
    reset_peak(device)
    first, ticks, samples, total = run(0)
    audio_s = samples / SR
    out = dict(streams=n_streams, first_chunk_ms=first, worst_tick_ms=max(ticks), total_ms=total,
               audio_s=audio_s, aggregate_rtf=total / 1e3 / audio_s, peak_mb=peak_mb(device))
    res["concurrent"] = out
    rows.append(dict(section=f"{n_streams} streams", config="first chunk (batched)", ms=f"{first:.2f}",
                     peak_mb=out["peak_mb"]))
    rows.append(dict(section=f"{n_streams} streams", config=f"{seconds:g}s each, total", ms=f"{total:.1f}",
                     rtf=f"{out['aggregate_rtf']:.4f}", note=f"worst tick {max(ticks):.1f} ms"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU, few reps")
    ap.add_argument("--model-dir", default=None, help="a real CosyVoice folder instead of random weights")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--sections", default="check_kernels,check_model,offline,stream,concurrent",
                    help="comma-separated sections (default all but ops and variants: check_kernels, check_model, "
                         "offline, stream, variants, concurrent, ops)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    reps = args.reps or (2 if args.smoke else 20)
    res = dict(device=device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               smoke=args.smoke, model=args.model_dir or "random weights, released config")
    rows: list[dict] = []
    kernels = KernelConfig(backend="reference" if device.type == "cpu" else "auto")
    with torch.inference_mode():
        dec = guarded(res, "setup", lambda: SpeechDecoder.from_pretrained(args.model_dir, device=device,
                                                                          kernels=kernels)
                      if args.model_dir else random_decoder(TINY_SIZES if args.smoke else FULL_SIZES, device,
                                                            kernels))
        if dec is None:
            write_json("vocoder.json", res)
            print(res["errors"])
            return
        prompt = make_prompt(1.0 if args.smoke else 3.0, device)
        seconds = [1.0, 2.0] if args.smoke else [5.0, 10.0]
        def section(name, fn):
            start = len(rows)
            guarded(res, name, fn)
            for r in rows[start:]:          # as it goes: a run cut short still shows what it measured
                print("  ", {k: v for k, v in r.items() if v not in (None, "")}, flush=True)

        if "check_kernels" in sections:
            section("check_kernels", lambda: check_kernels(device, res, rows))
        if "check_model" in sections:
            section("check_model", lambda: check_model(dec, device, res, rows, prompt))
        if "offline" in sections:
            section("offline", lambda: time_offline(dec, device, res, rows, prompt, reps, seconds))
        if "stream" in sections:
            section("stream", lambda: time_stream(dec, device, res, rows, prompt, max(3, reps // 4), seconds[-1]))
        if "variants" in sections:
            section("variants", lambda: time_variants(dec, device, res, rows, prompt, max(5, reps // 2)))
        if "tune_short" in sections and device.type == "cuda":
            section("tune_short", lambda: tune_short(device, res, rows))
        if "concurrent" in sections:
            section("concurrent", lambda: time_concurrent(dec, device, res, rows, prompt, 8, seconds[0]))
        if "ops" in sections and device.type == "cuda":
            section("ops", lambda: time_ops(device, res, rows))
    path = write_json("vocoder.json", res)
    print(f"\nspeech decoder on {res['device']} ({res['model']}); JSON: {path}")
    if res.get("errors"):
        print("FAILED SECTIONS:", {k: v[:200] for k, v in res["errors"].items()})
    print_table(rows, ["section", "config", "ms", "rtf", "peak_mb", "note"])


if __name__ == "__main__":
    main()
