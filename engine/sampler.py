"""Token sampling on the model's device: one host transfer per step, for the chosen ids.

Order as in HF/vLLM: logits processors (min_tokens stop masking, the Step-Audio repetition rule,
user processors), then temperature, top-k, top-p, then a draw. Draws use the exponential-race form
(argmax of p / E, E ~ Exp(1)).

Two paths draw that way. On a GPU, when every row is greedy or uses top-k with k <= 64 and no
top-p (the TTS settings: temperature 0.7, top-k 50), one Triton sampling kernel pair does the
whole draw (kernels/sampling.py): its noise comes from Philox seeded per row and step, from the
request's seed and its output length, or from the engine's host generator. Otherwise (and on the
CPU) the torch path below runs, with a per-request torch generator when the request has a seed.
Both are deterministic for a seed; they do not draw the same tokens as each other.
"""
from __future__ import annotations

import inspect
import random

import torch

from stepvox.kernels import use_triton
from stepvox.kernels.sampling import MAX_TOP_K, sample_top_k

from .device.staging import values_to_device
from .sequence import Sequence

REPETITION_WINDOW = 10


def repetition_banned_token(token_ids: list[int]) -> int | None:
    """Step-Audio's RepetitionAwareLogitsProcessor: with a full window of the last 10 tokens, the
    last token is banned when it appears more than once (ratio > 0.1) in that window."""
    if len(token_ids) < REPETITION_WINDOW:
        return None
    window = token_ids[-REPETITION_WINDOW:]
    last = window[-1]
    return last if window.count(last) >= 2 else None


def _call_processor(fn, seq: Sequence, row: torch.Tensor) -> torch.Tensor:
    params = len(inspect.signature(fn).parameters)
    if params == 3:
        return fn(seq.prompt_token_ids, seq.output_token_ids, row)
    return fn(seq.output_token_ids, row)


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit Philox seed for a request's draw number `step` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


class Sampler:
    def __init__(self, device: torch.device, eos_token_id: int, seed: int = 0, fused: bool | None = None,
                 backend: str = "auto"):
        """fused: use the Triton sampling kernels where they apply (None: on CUDA devices only; tests
        on the CPU pass True to run them under the interpreter); backend: the kernels' backend."""
        self.device = device
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.host_generator = random.Random(seed)
        self.fused = device.type == "cuda" if fused is None else fused

    def _request_generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.sampler_state is None:
            seq.sampler_state = torch.Generator(device=self.device)
            seq.sampler_state.manual_seed(seq.params.seed)
        return seq.sampler_state

    def apply_processors(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                for t in p.stop_ids(self.eos_token_id):
                    rows.append(i)
                    cols.append(t)
            if p.repetition_aware:
                banned = repetition_banned_token(seq.token_ids)
                if banned is not None:
                    rows.append(i)
                    cols.append(banned)
        if rows:
            dev = logits.device
            logits[values_to_device(rows, torch.long, dev), values_to_device(cols, torch.long, dev)] = float("-inf")
        for i, seq in enumerate(seqs):
            for fn in seq.params.logits_processors:
                logits[i] = _call_processor(fn, seq, logits[i])
        return logits

    def _plain_greedy(self, seqs: list[Sequence]) -> bool:
        """True when every row is greedy with nothing that changes its logits this step."""
        for s in seqs:
            p = s.params
            if not p.greedy or p.logits_processors or s.num_output_tokens < p.min_tokens:
                return False
            if p.repetition_aware and repetition_banned_token(s.token_ids) is not None:
                return False
        return True

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None) -> list[int]:
        """logits [N, V] (one row per sequence that samples this step; any float dtype, sampled in
        float32) -> N token ids. greedy_ids: the rows' argmax if the step already computed it
        (CUDA-graph decode steps)."""
        return self.sample(logits, seqs, greedy_ids).tolist()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None
               ) -> torch.Tensor:
        """As __call__, but the ids stay on the device ([N] integers; may be `greedy_ids` itself):
        nothing here waits for the GPU. The processors see each sequence's tokens as they stand."""
        if greedy_ids is not None and self._plain_greedy(seqs):
            return greedy_ids
        if self._fused_applies(logits, seqs):
            return self._sample_fused(logits, seqs)
        logits = self.apply_processors(logits.float(), seqs)
        if all(s.params.greedy for s in seqs):
            return logits.argmax(-1)
        dev = logits.device
        greedy = values_to_device([s.params.greedy for s in seqs], torch.bool, dev)
        temps = values_to_device([s.params.temperature if not s.params.greedy else 1.0 for s in seqs],
                                 torch.float32, dev)
        greedy_ids = logits.argmax(-1)
        scaled = logits / temps[:, None]
        top_ks = [s.params.top_k if s.params.top_k > 0 else 0 for s in seqs]
        if any(top_ks):
            scaled = self._top_k(scaled, top_ks)
        top_ps = [s.params.top_p for s in seqs]
        if any(p < 1.0 for p in top_ps):
            scaled = self._top_p(scaled, values_to_device(top_ps, torch.float32, dev))
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs)
        shared = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if len(shared) == len(seqs):
            noise.exponential_(generator=self.generator)
        elif shared:
            noise[values_to_device(shared, torch.long, dev)] = torch.empty(
                len(shared), probs.shape[1], device=dev).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            gen = self._request_generator(seq)
            if gen is not None:
                noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(-1)
        return torch.where(greedy, greedy_ids, sampled)

    def _fused_applies(self, logits: torch.Tensor, seqs: list[Sequence]) -> bool:
        if not self.fused or not use_triton(logits, self.backend):
            return False
        return all(s.params.greedy or (s.params.top_p == 1.0 and 0 < s.params.top_k <= MAX_TOP_K) for s in seqs)

    def _sample_fused(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if any(s.params.logits_processors for s in seqs):
            logits = logits.float()          # user processors get float32 rows
        logits = self.apply_processors(logits, seqs)
        dev = logits.device
        temps = values_to_device([0.0 if s.params.greedy else s.params.temperature for s in seqs], torch.float32, dev)
        seeds = [self.host_generator.getrandbits(63) if s.params.seed is None
                 else _step_seed(s.params.seed, s.num_output_tokens) for s in seqs]
        ints = values_to_device([1 if s.params.greedy else s.params.top_k for s in seqs] + seeds, torch.int64, dev)
        return sample_top_k(logits, temps, ints[:len(seqs)], ints[len(seqs):], backend=self.backend)

    @staticmethod
    def _top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
        vocab = logits.shape[1]
        ks_host = [k if 0 < k < vocab else vocab for k in top_ks]
        ks = values_to_device(ks_host, torch.long, logits.device)
        kth = logits.topk(max(ks_host), dim=-1).values.gather(1, (ks - 1)[:, None])
        return logits.masked_fill(logits < kth, float("-inf"))

    @staticmethod
    def _top_p(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs              # mass strictly before each token
        drop = before >= top_ps[:, None]               # keeps the smallest set reaching top_p (HF rule)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
