"""Flow model of the speech decoder: tokens + speaker prompt -> mel (SPEC.md §3.5 steps 1-6).

FlowModel holds the released modules under their flow.pt names (input_embedding,
spk_embed_affine_layer, encoder, encoder_proj, length_regulator, decoder.estimator) and prepares
the CFM inputs; FlowSolver (flow_solver.py) integrates the ODE. `FlowModel.generate` runs both for a
batch of requests:

  tokens = [prompt tokens; target tokens] -> Embedding -> ConformerEncoder -> encoder_proj (80)
  mel_len2 = int(N2 / input_frame_rate * 22050 / 256); prompt part interpolated to the prompt mel
  length and target part to mel_len2 *separately* (linear), concatenated, conv stack -> mu
  spks = Linear(normalize(speaker_192)); cond = [prompt mel; zeros]
  mel = CFM(z, mu, spks, cond)[:, prompt frames:]

Requests of one batch share the encoder (key padding mask) and the ODE solve (length padding with
masks); the regulator runs per request because its GroupNorm spans the whole sequence.

With CUDA graphs (FlowPrep), everything before the ODE solve runs as one graph per (batch, token
bucket, frame bucket): tokens right-padded (key padding mask), the two linear interpolations as a
gather + lerp with host-computed F.interpolate indices and weights, the regulator with GroupNorm
statistics over each request's valid frames and zero padding past its end, the mu prefix pasted by
mask. Valid frames get the eager result up to the rounding of the fused GroupNorm + Mish (one
rounding instead of two) and of SDPA's masked kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import KernelConfig
from ...kernels.flow_fused import group_norm_mish
from ..device.graphs import GraphCache, bucket_length
from .cosyvoice_config import FlowConfig, RegulatorConfig
from .flow_encoder import ConformerEncoder
from .flow_estimator import ConditionalDecoder


def linear_interp_table(n_in: int, n_out: int):
    """(i0, i1, w0, w1) per output sample of F.interpolate(mode="linear", align_corners=False) from
    n_in to n_out samples: out[j] = w0[j] * x[i0[j]] + w1[j] * x[i1[j]], in its float32 arithmetic
    (source position scale * (j + 0.5) - 0.5 as one fused multiply-add, as the compiled kernels
    round it: the float64 product of two float32 values is exact)."""
    j = np.arange(n_out, dtype=np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * (j + np.float32(0.5)).astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


class InterpolateRegulator(nn.Module):
    """Linear interpolation to the mel length + `num_convs` x (Conv1d k3, GroupNorm, Mish) + Conv1d k1."""

    def __init__(self, cfg: RegulatorConfig, kernels: KernelConfig):
        super().__init__()
        self.kernels = kernels
        layers = []
        for _ in range(cfg.num_convs):
            layers += [nn.Conv1d(cfg.channels, cfg.channels, 3, 1, 1), nn.GroupNorm(cfg.groups, cfg.channels),
                       nn.Mish()]
        layers.append(nn.Conv1d(cfg.channels, cfg.out_channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, h_prompt: torch.Tensor, h_target: torch.Tensor, mel_len1: int, mel_len2: int) -> torch.Tensor:
        """h_*: [1, T, C] encoder outputs of the prompt / target tokens -> mu [1, C, mel_len1 + mel_len2]."""
        x = F.interpolate(h_target.transpose(1, 2).contiguous(), size=mel_len2, mode="linear")
        if h_prompt.shape[1] != 0:
            x1 = F.interpolate(h_prompt.transpose(1, 2).contiguous(), size=mel_len1, mode="linear")
            x = torch.cat([x1, x], dim=2)
        return self.model(x)

    def convs_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The conv stack on a right-padded batch: x [B, C, L] zero where mask [B, 1, L] is 0;
        GroupNorm statistics over the valid frames, zeros fed to each conv past the end."""
        layers = list(self.model)
        for i in range(0, len(layers) - 1, 3):
            conv, gn = layers[i], layers[i + 1]
            x = group_norm_mish(conv(x), gn.weight, gn.bias, gn.num_groups, gn.eps, mask,
                                backend=self.kernels.backend)
        return layers[-1](x) * mask


class CFMDecoder(nn.Module):
    """Holds the estimator under the checkpoint's `decoder.estimator` prefix."""

    def __init__(self, estimator: ConditionalDecoder):
        super().__init__()
        self.estimator = estimator


@dataclass
class FlowRequest:
    """One token2mel job. Tensors live on the model's device.
    tokens: [N2] flow ids; prompt_tokens: [N1]; prompt_mel: [mel_len1, 80]; speaker: [192] CAM++
    embedding; mel_len: target frames (FlowConfig.mel_frames(N2) offline); noise: [80, >= mel_len1 +
    mel_len] initial ODE state (sliced to length); mu_prefix: [80, K] replaces mu's first K frames
    (streaming cache)."""
    tokens: torch.Tensor
    prompt_tokens: torch.Tensor
    prompt_mel: torch.Tensor
    speaker: torch.Tensor
    mel_len: int
    noise: torch.Tensor
    mu_prefix: torch.Tensor | None = None

    @property
    def prompt_frames(self) -> int:
        return self.prompt_mel.shape[0]

    @property
    def total_frames(self) -> int:
        return self.prompt_frames + self.mel_len


class FlowModel(nn.Module):
    def __init__(self, cfg: FlowConfig, kernels: KernelConfig = KernelConfig()):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.regulator, kernels)
        self.decoder = CFMDecoder(ConditionalDecoder(cfg.estimator, kernels))

    @property
    def estimator(self) -> ConditionalDecoder:
        return self.decoder.estimator

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embedding.weight.dtype

    @torch.no_grad()
    def speaker_condition(self, speakers: torch.Tensor) -> torch.Tensor:
        """[B, 192] CAM++ embeddings -> [B, 80] = Linear(normalize(e))."""
        return self.spk_embed_affine_layer(F.normalize(speakers.to(self.dtype), dim=1))

    @torch.no_grad()
    def encode(self, reqs: list[FlowRequest]) -> list[torch.Tensor]:
        """mu [80, mel_len1 + mel_len2] per request (model dtype), mu_prefix applied."""
        ids = [torch.cat([r.prompt_tokens, r.tokens]).long() for r in reqs]
        lengths = [int(i.numel()) for i in ids]
        batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
        x = self.input_embedding(batch.clamp(min=0))
        lens = torch.tensor(lengths, device=x.device) if len(set(lengths)) > 1 else None
        h = self.encoder_proj(self.encoder(x, lens))
        mus = []
        for i, r in enumerate(reqs):
            n1, n2 = r.prompt_tokens.numel(), r.tokens.numel()
            mu = self.length_regulator(h[i:i + 1, :n1], h[i:i + 1, n1:n1 + n2], r.prompt_frames, r.mel_len)[0]
            if r.mu_prefix is not None and r.mu_prefix.shape[1] > 0:
                mu = mu.clone()
                mu[:, :r.mu_prefix.shape[1]] = r.mu_prefix.to(mu.dtype)
            mus.append(mu)
        return mus

    def encode_padded(self, ids: torch.Tensor, table: torch.Tensor, prefix: torch.Tensor,
                      speakers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Graph-capturable encode of a bucketed batch (FlowPrep.inputs builds the arguments):
        ids [B, T] (right-padded); table [B, 7, L] float32 rows i0, i1, w0, w1 (interpolation from
        encoder rows to mel frames), frame mask, prefix mask, and the token count in [:, 6, 0];
        prefix [B, C, L]; speakers [B, 192]. Returns (mu [B, C, L], zero past each request's frames;
        spks [B, C])."""
        lengths = table[:, 6, 0].long()
        h = self.encoder_proj(self.encoder(self.input_embedding(ids), lengths))       # [B, T, C]
        c = h.shape[-1]
        rows0 = torch.gather(h, 1, table[:, 0].long()[:, :, None].expand(-1, -1, c)).float()
        rows1 = torch.gather(h, 1, table[:, 1].long()[:, :, None].expand(-1, -1, c)).float()
        x = (table[:, 2, :, None] * rows0 + table[:, 3, :, None] * rows1).to(h.dtype).transpose(1, 2)
        mask = table[:, 4:5].to(h.dtype)
        mu = self.length_regulator.convs_masked(x.contiguous(), mask)
        mu = torch.where(table[:, 5:6] > 0, prefix, mu)
        return mu, self.speaker_condition(speakers)

    @torch.no_grad()
    def generate(self, reqs: list[FlowRequest], solver, prep: "FlowPrep | None" = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns (mel [80, mel_len] float32 per request, mu [80, total] per request). With `prep`,
        batches go through the bucketed pre-solve (a CUDA graph when the solver uses graphs)."""
        if prep is not None and prep.wanted(solver, reqs[0].tokens.device):
            return self._generate_bucketed(reqs, solver, prep)
        mus = self.encode(reqs)
        spks = self.speaker_condition(torch.stack([r.speaker for r in reqs]))
        conds, noises = [], []
        for r, mu in zip(reqs, mus):
            cond = torch.zeros_like(mu)
            cond[:, :r.prompt_frames] = r.prompt_mel.T.to(mu.dtype)
            conds.append(cond)
            if r.noise.shape[0] != mu.shape[0] or r.noise.shape[1] < r.total_frames:
                raise ValueError(f"noise must be [{mu.shape[0]}, >= {r.total_frames}], got {list(r.noise.shape)}")
            noises.append(r.noise[:, :r.total_frames].to(mu.dtype))
        out = solver.solve(noises, mus, spks, conds)
        mels = [o[:, r.prompt_frames:r.total_frames].float() for o, r in zip(out, reqs)]
        return mels, mus

    def _generate_bucketed(self, reqs, solver, prep: "FlowPrep"):
        lengths = [r.total_frames for r in reqs]
        frames = solver.bucket_length(max(lengths))
        device = reqs[0].tokens.device
        mu, spks, mask = prep.run(reqs, frames, graphs=solver.graphs_on(device))
        b, c = len(reqs), mu.shape[1]
        z = torch.zeros(b, c, frames, dtype=mu.dtype, device=device)
        cond = torch.zeros_like(z)
        for i, r in enumerate(reqs):
            if r.noise.shape[0] != c or r.noise.shape[1] < r.total_frames:
                raise ValueError(f"noise must be [{c}, >= {r.total_frames}], got {list(r.noise.shape)}")
            z[i, :, :r.total_frames] = r.noise[:, :r.total_frames]
            cond[i, :, :r.prompt_frames] = r.prompt_mel.T
        out = solver.solve_padded(z, mu, spks, cond, mask, padded=any(n < frames for n in lengths))
        mels = [out[i, :, r.prompt_frames:r.total_frames].float() for i, r in enumerate(reqs)]
        mus = [mu[i, :, :r.total_frames].clone() for i, r in enumerate(reqs)]
        return mels, mus


class FlowPrep:
    """FlowModel.encode_padded for length-bucketed batches, replayed from one CUDA graph per
    (batch, token bucket, frame bucket) when the solver uses graphs (eager otherwise; tests run it
    that way with the solver's `bucket_eager`). Outputs are static buffers: FlowModel consumes them
    (copies) before the next call."""

    def __init__(self, flow: FlowModel, token_bucket: int = 16):
        self.flow = flow
        self.token_bucket = token_bucket
        self.graphs = GraphCache(self._body, self._static, flow.input_embedding.weight.device, warmups=1)

    @property
    def graph_count(self) -> int:
        return len(self.graphs)

    @torch.no_grad()
    def capture(self, batch: int, tokens: int, frames: int) -> None:
        """Capture the graph of one (batch, token bucket, frame bucket) ahead of time."""
        self.graphs.entry((batch, tokens, frames))

    def wanted(self, solver, device) -> bool:
        return solver.graphs_on(device) or solver.bucket_eager

    def inputs(self, reqs: list[FlowRequest], frames: int, tokens: int, device) -> dict:
        """Bucketed inputs of encode_padded (ids padded to `tokens`, tables to `frames`)."""
        b = len(reqs)
        table = np.zeros((b, 7, frames), dtype=np.float32)
        ids = torch.zeros(b, tokens, dtype=torch.long, device=device)
        prefix = torch.zeros(b, self.flow.cfg.output_size, frames, dtype=self.flow.dtype, device=device)
        for i, r in enumerate(reqs):
            n1, n2 = r.prompt_tokens.numel(), r.tokens.numel()
            p, m = r.prompt_frames, r.mel_len
            ids[i, :n1 + n2] = torch.cat([r.prompt_tokens, r.tokens]).long()
            parts = [(0, n1, 0, p)] if n1 else []
            parts.append((n1, n2, p, m))
            for row0, n_in, f0, n_out in parts:
                i0, i1, w0, w1 = linear_interp_table(n_in, n_out)
                table[i, 0, f0:f0 + n_out], table[i, 1, f0:f0 + n_out] = i0 + row0, i1 + row0
                table[i, 2, f0:f0 + n_out], table[i, 3, f0:f0 + n_out] = w0, w1
            table[i, 4, :p + m] = 1
            if r.mu_prefix is not None and r.mu_prefix.shape[1] > 0:
                k = r.mu_prefix.shape[1]
                table[i, 5, :k] = 1
                prefix[i, :, :k] = r.mu_prefix
            table[i, 6, 0] = n1 + n2
        return {"ids": ids, "table": torch.from_numpy(table).to(device, non_blocking=True), "prefix": prefix,
                "speakers": torch.stack([r.speaker for r in reqs]).float()}

    def run(self, reqs: list[FlowRequest], frames: int, graphs: bool):
        """-> (mu [B, C, frames], spks [B, C], frame mask [B, 1, frames]) for `reqs`."""
        device = reqs[0].tokens.device
        n = max(r.prompt_tokens.numel() + r.tokens.numel() for r in reqs)
        tokens = bucket_length(n, self.token_bucket)
        inp = self.inputs(reqs, frames, tokens, device)
        order = (inp["ids"], inp["table"], inp["prefix"], inp["speakers"])
        if not graphs:
            return self._body(None, *order)
        return self.graphs.run((len(reqs), tokens, frames), order)

    def _static(self, key):
        b, tokens, frames = key
        dev, c = self.graphs.device, self.flow.cfg.output_size
        table = torch.zeros(b, 7, frames, device=dev)
        table[:, 4] = 1
        table[:, 6, 0] = 1
        return (torch.zeros(b, tokens, dtype=torch.long, device=dev), table,
                torch.zeros(b, c, frames, dtype=self.flow.dtype, device=dev),
                torch.ones(b, self.flow.cfg.spk_embed_dim, device=dev))

    def _body(self, key, ids, table, prefix, speakers):
        mu, spks = self.flow.encode_padded(ids, table, prefix, speakers)
        return mu, spks, table[:, 4:5].to(mu.dtype)
