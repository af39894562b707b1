"""Euler solver of the conditional flow matching ODE with classifier-free guidance (SPEC.md §3.5 step 5).

Schedule: t_span = linspace(0, 1, n+1) in the model dtype, cosine warp 1 - cos(t pi/2), and the
official loop's own rounding (t += dt; dt = t_span[k+1] - t, all in the model dtype). Each step runs
the estimator on [cond; uncond] (mu, spks, cond zeroed in the second half) and moves
x += dt * ((1 + w) v_cond - w v_uncond) with w = inference_cfg_rate.

The requests of a batch are right-padded to one length with a frame mask (the estimator then keeps
padded frames out of every valid frame's result). On CUDA the whole n-step solve is captured as one
CUDA graph per (batch size, length bucket, padded, fused); the length is rounded up to `bucket`
frames so a few graphs serve all lengths. The constant parts (time projections of every step,
dt values) are computed once, outside the graphs.
"""
from __future__ import annotations

import torch

from ...kernels.flow_ode import cfg_euler_step, cfg_euler_step_reference
from ..device.graphs import GraphCache, bucket_length
from .cosyvoice_config import CFMConfig
from .flow_estimator import ConditionalDecoder


def euler_schedule(n_steps: int, t_scheduler: str, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(t_k, dt_k)] as 0-d tensors of `dtype`, rounded exactly as the official loop rounds them."""
    span = torch.linspace(0, 1, n_steps + 1, dtype=dtype)
    if t_scheduler == "cosine":
        span = 1 - torch.cos(span * 0.5 * torch.pi)
    t, dt = span[0], span[1] - span[0]
    steps = []
    for k in range(1, n_steps + 1):
        steps.append((t, dt))
        t = t + dt
        if k < n_steps:
            dt = span[k + 1] - t
    return steps


class FlowSolver:
    def __init__(self, estimator: ConditionalDecoder, cfm: CFMConfig, mel_channels: int, *,
                 use_cuda_graphs: bool = True, fused: bool = True, bucket: int = 32, bucket_eager: bool = False):
        """fused: the estimator's channels-last kernels and the fused Euler step (False: plain
        modules, the reference); bucket_eager: pad eager solves to the length buckets like graph
        solves (how the CPU tests exercise the graphs' inputs)."""
        self.estimator = estimator
        self.cfg_rate = float(cfm.inference_cfg_rate)
        self.n_steps = cfm.n_timesteps
        self.t_scheduler = cfm.t_scheduler
        self.channels = mel_channels
        self.use_cuda_graphs = use_cuda_graphs
        self.fused = fused
        self.bucket = bucket
        self.bucket_eager = bucket_eager
        self._constants = None
        self.graphs = GraphCache(self._graph_body, self._graph_static, estimator.time_mlp.linear_1.weight.device,
                                 warmups=1)

    # ------------------------------------------------------------------ constants of the schedule
    def _step_constants(self, device, dtype):
        key = (str(device), dtype)
        if self._constants is None or self._constants[0] != key:
            steps = euler_schedule(self.n_steps, self.t_scheduler, dtype)
            per_step = []
            for t, dt in steps:
                proj = self.estimator.time_projections(t.reshape(1).to(device))
                per_step.append((proj, float(dt), dt.to(device)))
            self._constants = (key, per_step)
        return self._constants[1]

    # ------------------------------------------------------------------ the n-step solve
    def _solve_buffers(self, z, mu, spks, cond, mask, out, padded: bool, fused: bool):
        """All tensors batch-first and padded to one length: z, mu, cond [B, C, L]; spks [B, C];
        mask [B, 1, L]; result written into `out` [B, C, L]. Graph-capturable."""
        b, c, length = z.shape
        inp = torch.zeros(2 * b, 4 * c, length, dtype=z.dtype, device=z.device)
        inp[:b, c:2 * c] = mu
        inp[:b, 2 * c:3 * c] = spks[:, :, None]
        inp[:b, 3 * c:] = cond
        inp[:b, :c] = z
        inp[b:, :c] = z
        mask2 = torch.cat([mask, mask])
        x = z
        steps = self._step_constants(z.device, z.dtype)
        kernels = self.estimator.kernels
        for k, (proj, dt, dt_tensor) in enumerate(steps):
            v = self.estimator(inp, mask2, proj, padded=padded, fused=fused)
            last = k == len(steps) - 1
            if fused:
                x = cfg_euler_step(v, x, mask, dt, self.cfg_rate, out=out, next_input=None if last else inp,
                                   backend=kernels.backend, pdl=kernels.pdl)
            else:
                x = cfg_euler_step_reference(v, x, mask, dt_tensor, self.cfg_rate, out=out)
                if not last:
                    inp[:b, :c] = x
                    inp[b:, :c] = x
        return out

    def _graph_static(self, key):
        b, length, padded, dtype = key
        c, dev = self.channels, self.graphs.device
        self._step_constants(dev, dtype)
        return (torch.zeros(b, c, length, dtype=dtype, device=dev), torch.zeros(b, c, length, dtype=dtype, device=dev),
                torch.zeros(b, c, dtype=dtype, device=dev), torch.zeros(b, c, length, dtype=dtype, device=dev),
                torch.ones(b, 1, length, dtype=dtype, device=dev), torch.zeros(b, c, length, dtype=dtype, device=dev))

    def _graph_body(self, key, z, mu, spks, cond, mask, out):
        return self._solve_buffers(z, mu, spks, cond, mask, out, padded=key[2], fused=self.fused)

    @torch.no_grad()
    def capture(self, batch: int, length: int, padded: bool, dtype) -> None:
        """Capture the graph of one (batch, bucketed length) ahead of time (no-op without graphs)."""
        if self.graphs_on(self.graphs.device):
            self.graphs.entry((batch, self.bucket_length(length), padded, dtype))

    @property
    def graph_count(self) -> int:
        return len(self.graphs)

    def graphs_on(self, device) -> bool:
        return self.use_cuda_graphs and torch.device(device).type == "cuda"

    def bucket_length(self, length: int) -> int:
        return bucket_length(length, self.bucket)

    @torch.no_grad()
    def solve(self, noises: list[torch.Tensor], mus: list[torch.Tensor], spks: torch.Tensor,
              conds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per request z, mu, cond [C, L_i] and spks [B, C] -> x(1) [C, L_i] per request."""
        lengths = [m.shape[1] for m in mus]
        device, dtype = mus[0].device, mus[0].dtype
        graphs = self.graphs_on(device)
        length = self.bucket_length(max(lengths)) if graphs or self.bucket_eager else max(lengths)
        b, c = len(mus), self.channels

        def stack(items):
            out = torch.zeros(b, c, length, dtype=dtype, device=device)
            for i, t in enumerate(items):
                out[i, :, :t.shape[1]] = t
            return out

        mask = torch.zeros(b, 1, length, dtype=dtype, device=device)
        for i, n in enumerate(lengths):
            mask[i, :, :n] = 1
        result = self.solve_padded(stack(noises), stack(mus), spks, stack(conds), mask,
                                   padded=any(n < length for n in lengths))
        return [result[i, :, :n] for i, n in enumerate(lengths)]

    @torch.no_grad()
    def solve_padded(self, z: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                     mask: torch.Tensor, padded: bool) -> torch.Tensor:
        """Batch-first inputs already padded to one length (a bucket multiple when graphs are on):
        z, mu, cond [B, C, L] (model dtype), spks [B, C], mask [B, 1, L]. Returns x(1) [B, C, L]
        (a fresh tensor)."""
        b, _, length = z.shape
        spks = spks.to(z.dtype)
        if self.graphs_on(z.device):
            return self.graphs.run((b, length, padded, z.dtype), (z, mu, spks, cond, mask)).clone()
        result = torch.empty_like(z)
        self._solve_buffers(z, mu, spks, cond, mask, result, padded=padded, fused=self.fused)
        return result
