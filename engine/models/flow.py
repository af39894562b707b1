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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cosyvoice_config import FlowConfig, RegulatorConfig
from .flow_encoder import ConformerEncoder
from .flow_estimator import ConditionalDecoder


class InterpolateRegulator(nn.Module):
    """Linear interpolation to the mel length + `num_convs` x (Conv1d k3, GroupNorm, Mish) + Conv1d k1."""

    def __init__(self, cfg: RegulatorConfig):
        super().__init__()
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
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.regulator)
        self.decoder = CFMDecoder(ConditionalDecoder(cfg.estimator))

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

    @torch.no_grad()
    def generate(self, reqs: list[FlowRequest], solver) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns (mel [80, mel_len] float32 per request, mu [80, total] per request)."""
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
