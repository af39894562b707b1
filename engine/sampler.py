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

A request whose own part of the step fails (its values do not read as numbers, its seed does not
seed a generator, a logits processor raises or returns something other than its row) fails alone:
its row is reset to zeros (a harmless draw) and `Sampled.failed` names it with a typed error. Rows
that went through user processors are also checked on the device, without a sync: a row left with
NaN or +inf, or with every token masked, draws a negative code instead of an id, which
`Sampled.failures` turns into that request's error once the host has read the ids.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import operator
import random

import torch

from stepvox.kernels import use_triton
from stepvox.kernels.sampling import MAX_TOP_K, sample_top_k

from .device.staging import values_to_device
from .errors import InvalidRequestError
from .sequence import Sequence

REPETITION_WINDOW = 10
UNUSABLE_LOGITS = -1          # a row's processed logits hold NaN or +inf
ALL_MASKED = -2               # a row's processed logits are -inf everywhere


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


def _run_processor(k: int, fn, seq: Sequence, row: torch.Tensor) -> torch.Tensor:
    """Processor #k's new row for the request, checked; raises InvalidRequestError naming both."""
    try:
        out = _call_processor(fn, seq, row)
    except Exception as exc:  # noqa: BLE001 - user code: its failure is its request's
        raise seq.failure(f"logits processor #{k}", exc) from exc
    what = f"logits processor #{k} of request {seq.request_id}"
    if not isinstance(out, torch.Tensor):
        raise InvalidRequestError(f"{what} returned {type(out).__name__}, not a tensor")
    if out.shape != row.shape:
        raise InvalidRequestError(f"{what} returned shape {tuple(out.shape)}, not its row's {tuple(row.shape)}")
    if not out.is_floating_point():
        raise InvalidRequestError(f"{what} returned {out.dtype} logits, not floating point")
    return out


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit Philox seed for a request's draw number `step` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


@dataclasses.dataclass(slots=True)
class RowPlan:
    """One row's sampling values, read from its request once and checked, so that the batched
    math below only sees well-typed numbers."""
    greedy: bool
    temperature: float                  # 1.0 for greedy rows
    top_k: int                          # 0: off
    top_p: float
    masked: list[int]                   # ids set to -inf before the user's processors
    processors: list
    seed: int | None
    generator: torch.Generator | None   # the request's own, for seeded rows

    @property
    def plain_greedy(self) -> bool:
        return self.greedy and not self.masked and not self.processors


# a failed row's stand-in: greedy on its zeroed logits, touching no generator
_FAILED_ROW = RowPlan(True, 1.0, 0, 1.0, [], [], None, None)


@dataclasses.dataclass
class Sampled:
    """A step's draws on the device, and the rows that failed instead."""
    tokens: torch.Tensor                         # [N] ids; a checked row may hold a negative code
    failed: dict[int, InvalidRequestError]       # rows that failed on the host (their id is a placeholder)
    seqs: list[Sequence]
    checked: bool = False                        # some rows were checked on the device

    def feed(self) -> torch.Tensor:
        """The ids as input of a step launched before they are read: codes become a valid id (the
        row is dropped once its code is seen)."""
        return self.tokens.clamp_min(0) if self.checked else self.tokens

    def failures(self, tokens: list[int]) -> dict[int, InvalidRequestError]:
        """Every failed row, given the ids read back to the host."""
        failed = dict(self.failed)
        if self.checked:
            for i, token in enumerate(tokens):
                if token == UNUSABLE_LOGITS:
                    failed[i] = InvalidRequestError(
                        f"the logits processors of request {self.seqs[i].request_id} returned NaN or +inf logits "
                        f"(mask a token with -inf, favour one with a large finite value)")
                elif token == ALL_MASKED:
                    failed[i] = InvalidRequestError(
                        f"the logits processors of request {self.seqs[i].request_id} masked every token")
        return failed


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

    def _request_generator(self, seq: Sequence, seed: int) -> torch.Generator:
        if seq.sampler_state is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            seq.sampler_state = generator
        return seq.sampler_state

    def _plan_row(self, seq: Sequence, vocab: int) -> RowPlan:
        """Read one request's sampling values (raises whatever reading them raises)."""
        p = seq.params
        temperature = float(p.temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature {p.temperature!r} is not a finite number >= 0")
        top_k = operator.index(p.top_k)
        top_p = float(p.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p {p.top_p!r} is outside (0, 1]")
        masked = []
        if seq.num_output_tokens < p.min_tokens:
            masked += [operator.index(t) for t in p.stop_ids(self.eos_token_id)]
        if p.repetition_aware:
            banned = repetition_banned_token(seq.token_ids)
            if banned is not None:
                masked.append(banned)
        if any(not 0 <= t < vocab for t in masked):
            raise ValueError(f"stop ids {masked} reach outside the vocabulary of {vocab}")
        seed = None if p.seed is None else operator.index(p.seed)
        generator = None if seed is None else self._request_generator(seq, seed)
        greedy = temperature == 0.0
        return RowPlan(greedy, 1.0 if greedy else temperature, max(top_k, 0), top_p, masked,
                       p.logits_processors or [], seed, generator)

    def _plan_rows(self, seqs: list[Sequence], vocab: int) -> tuple[list[RowPlan], dict[int, InvalidRequestError]]:
        plans, failed = [], {}
        for i, seq in enumerate(seqs):
            try:
                plans.append(self._plan_row(seq, vocab))
            except Exception as exc:  # noqa: BLE001 - the request's own values: it fails alone
                failed[i] = seq.failure("reading the sampling parameters", exc)
                plans.append(_FAILED_ROW)
        return plans, failed

    def _apply_processors(self, logits: torch.Tensor, seqs: list[Sequence], plans: list[RowPlan],
                          failed: dict[int, InvalidRequestError]) -> tuple[torch.Tensor, list[int]]:
        """Mask ids, run the user processors row by row (a row whose processor fails is added to
        `failed`) and zero the failed rows. Returns the logits and the rows the user processed."""
        rows, cols = [], []
        for i, plan in enumerate(plans):
            rows += [i] * len(plan.masked)
            cols += plan.masked
        if rows:
            dev = logits.device
            logits[values_to_device(rows, torch.long, dev), values_to_device(cols, torch.long, dev)] = float("-inf")
        processed = []
        for i, (seq, plan) in enumerate(zip(seqs, plans)):
            if not plan.processors:
                continue
            k = 0
            try:
                for k, fn in enumerate(plan.processors):
                    logits[i] = _run_processor(k, fn, seq, logits[i])
                processed.append(i)
            except InvalidRequestError as error:
                failed[i] = error
            except Exception as exc:  # noqa: BLE001 - the row it returned does not fit
                failed[i] = seq.failure(f"storing the row of logits processor #{k}", exc)
        if failed:
            logits[values_to_device(sorted(failed), torch.long, logits.device)] = 0.0
        return logits, processed

    @staticmethod
    def _check_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Codes for the given rows (0: fine), on the device; unusable rows are zeroed so that
        their draw is well defined."""
        index = values_to_device(rows, torch.long, logits.device)
        sub = logits[index]
        unusable = (sub.isnan() | sub.isposinf()).any(-1)
        all_masked = (sub == float("-inf")).all(-1)
        codes = torch.where(unusable, UNUSABLE_LOGITS, torch.where(all_masked, ALL_MASKED, 0))
        logits[index] = torch.where((codes != 0)[:, None], 0.0, sub)
        return codes

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None) -> list[int]:
        """logits [N, V] (one row per sequence that samples this step; any float dtype, sampled in
        float32) -> N token ids. greedy_ids: the rows' argmax if the step already computed it
        (CUDA-graph decode steps). Raises the first failed row's error."""
        sampled = self.sample(logits, seqs, greedy_ids)
        tokens = sampled.tokens.tolist()
        failed = sampled.failures(tokens)
        if failed:
            raise failed[min(failed)]
        return tokens

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None) -> Sampled:
        """As __call__, but the ids stay on the device ([N] integers; may be `greedy_ids` itself)
        and failed rows are reported, not raised: nothing here waits for the GPU. The processors see
        each sequence's tokens as they stand."""
        plans, failed = self._plan_rows(seqs, logits.shape[1])
        if greedy_ids is not None and not failed and all(p.plain_greedy for p in plans):
            return Sampled(greedy_ids, failed, seqs)
        fused = self._fused_applies(logits, plans)
        if not fused or any(p.processors for p in plans):
            logits = logits.float()          # user processors get float32 rows
        logits, processed = self._apply_processors(logits, seqs, plans, failed)
        codes = self._check_rows(logits, processed) if processed else None
        tokens = self._sample_fused(logits, seqs, plans) if fused else self._sample_torch(logits, plans)
        if codes is not None:
            index = values_to_device(processed, torch.long, tokens.device)
            tokens = tokens.index_put((index,), torch.where(codes != 0, codes.to(tokens.dtype), tokens[index]))
        return Sampled(tokens, failed, seqs, checked=codes is not None)

    def _sample_torch(self, logits: torch.Tensor, plans: list[RowPlan]) -> torch.Tensor:
        if all(p.greedy for p in plans):
            return logits.argmax(-1)
        dev = logits.device
        greedy = values_to_device([p.greedy for p in plans], torch.bool, dev)
        temps = values_to_device([p.temperature for p in plans], torch.float32, dev)
        greedy_ids = logits.argmax(-1)
        scaled = logits / temps[:, None]
        top_ks = [p.top_k for p in plans]
        if any(top_ks):
            scaled = self._top_k(scaled, top_ks)
        top_ps = [p.top_p for p in plans]
        if any(p < 1.0 for p in top_ps):
            scaled = self._top_p(scaled, values_to_device(top_ps, torch.float32, dev))
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs)
        shared = [i for i, p in enumerate(plans) if p.generator is None]
        if len(shared) == len(plans):
            noise.exponential_(generator=self.generator)
        elif shared:
            noise[values_to_device(shared, torch.long, dev)] = torch.empty(
                len(shared), probs.shape[1], device=dev).exponential_(generator=self.generator)
        for i, p in enumerate(plans):
            if p.generator is not None:
                noise[i].exponential_(generator=p.generator)
        sampled = (probs / noise).argmax(-1)
        return torch.where(greedy, greedy_ids, sampled)

    def _fused_applies(self, logits: torch.Tensor, plans: list[RowPlan]) -> bool:
        if not self.fused or not use_triton(logits, self.backend):
            return False
        return all(p.greedy or (p.top_p == 1.0 and 0 < p.top_k <= MAX_TOP_K) for p in plans)

    def _sample_fused(self, logits: torch.Tensor, seqs: list[Sequence], plans: list[RowPlan]) -> torch.Tensor:
        dev = logits.device
        temps = values_to_device([0.0 if p.greedy else p.temperature for p in plans], torch.float32, dev)
        seeds = [self.host_generator.getrandbits(63) if p.seed is None else _step_seed(p.seed, s.num_output_tokens)
                 for s, p in zip(seqs, plans)]
        ints = values_to_device([1 if p.greedy else p.top_k for p in plans] + seeds, torch.int64, dev)
        return sample_top_k(logits, temps, ints[:len(plans)], ints[len(plans):], backend=self.backend)

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
