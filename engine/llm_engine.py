"""The synchronous engine: requests in, one scheduled step at a time, outputs out.

Async scheduling (EngineConfig.async_scheduling; with tensor parallelism the workers get the ids in
a broadcast behind the plan): when the step after this one is known
to be a decode of the same sequences (nobody waits, nobody is preempted), it is launched right after
this step's sampling is queued, fed with the sampled ids on the device, before the host reads them.
The GPU then runs step n+1 while the host does step n's bookkeeping (stop checks, detokenisation,
outputs). A sequence that stops at step n (an end token, an abort, a failure) wastes its row of
step n+1; the row is dropped, the KV it wrote lies past the sequence's end in a page it owned.

Request isolation: whatever fails because of one request inside a step (its sampling values, its
logits processors, its stop check, its detokenisation) finishes that request alone with
finish_reason "error" and a typed `InvalidRequestError` naming it and the cause in
`RequestOutput.error`; its pages are freed at once and the other requests' tokens do not change.
A row that fails while sampling stops the step from being launched ahead (its values may be what
failed); one found later (NaN logits seen in the ids read back, a stop check) is dropped from the
step already running ahead, like an abort. Anything else a step raises is a fault of the engine
and propagates.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import torch

from . import checks
from .config import EngineConfig, Step1Config
from .device.staging import values_to_device
from .errors import InvalidRequestError, KVCacheExhaustedError, PromptTooLongError
from .executors import create_executor
from .kv_cache import BlockManager
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from .sequence import Sequence
from .step_times import StepTimes, step_kind
from .tokenizer import Step1Tokenizer

log = logging.getLogger("stepvox")


@dataclasses.dataclass
class LaunchedStep:
    """A step queued on the device whose tokens the host has not read yet."""
    sched: SchedulerOutput
    logits: torch.Tensor
    sampling: list[ScheduledChunk]           # the chunks that sample, in logits row order
    greedy: torch.Tensor | None              # their argmax when the step computed it


class TokenReadback:
    """Sampled ids from the device to the host, waiting only for the work queued before the copy
    (a step launched after it keeps the GPU busy meanwhile)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffer = None

    def start(self, tokens: torch.Tensor):
        if not self.cuda:
            return tokens
        n = tokens.numel()
        if self.buffer is None or self.buffer.numel() < n:
            self.buffer = torch.empty(max(n, 256), dtype=torch.long, pin_memory=True)
        # one buffer is enough: a step's ids are read (wait) before the next step's copy is queued
        self.buffer[:n].copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return self.buffer[:n], done

    def wait(self, handle) -> list[int]:
        if not self.cuda:
            return handle.tolist()
        host, done = handle
        done.synchronize()
        return host.tolist()


class LLMEngine:
    def __init__(self, model_path: str, engine_config: EngineConfig | None = None, executor=None):
        self.ecfg = engine_config or EngineConfig()
        self.ecfg.validate()
        self.model_path = model_path
        self.cfg = Step1Config.from_folder(model_path)
        self.device = self.ecfg.resolve_device()
        self.dtype = self.ecfg.resolve_dtype(self.device)
        self.max_model_len = self.ecfg.model_len(self.cfg)        # checks the options against the model
        self.tokenizer = Step1Tokenizer.from_folder(model_path, self.cfg.vocab_size)
        self.executor = executor if executor is not None else create_executor(model_path, self.cfg, self.ecfg)
        self.block_manager = BlockManager(self.executor.num_pages, self.ecfg.page_size,
                                          self.ecfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.ecfg.max_num_seqs, self.ecfg.max_num_batched_tokens,
                                   self.ecfg.max_prefill_while_decoding)
        self.sampler = Sampler(self.executor.sampling_device, self.cfg.eos_token_id, self.ecfg.seed,
                               fused=None if self.ecfg.triton_sampling else False, backend=self.ecfg.kernel_backend)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "preemptions": 0, "steps_ahead": 0}
        self.step_times = StepTimes()       # each step() that finished a step, by kind (step_times.py)
        self.async_scheduling = self.ecfg.async_scheduling
        self._readback = TokenReadback(self.executor.sampling_device)
        self._pending: LaunchedStep | None = None      # the step launched ahead, not read yet

    # ---------------------------------------------------------------- requests
    def make_sequence(self, prompt, params: SamplingParams | None, request_id: str | None = None) -> Sequence:
        """Validate a request and build its sequence (does not queue it)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params are a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_bos=True)
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            if not all(checks.is_integer(t) for t in prompt):
                raise InvalidRequestError(f"a prompt of token ids holds other values: {list(prompt)[:8]}")
            text, ids = None, [int(t) for t in prompt]
        else:
            raise InvalidRequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        self.tokenizer.check_ids(ids)
        bad_stop = [t for t in params.stop_token_ids if not checks.is_integer(t) or not 0 <= t < self.cfg.vocab_size]
        if bad_stop:
            raise InvalidRequestError(f"stop_token_ids outside the vocabulary: {bad_stop}")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt of {len(ids)} tokens leaves no room to generate within "
                                     f"max_model_len {self.max_model_len}")
        pages = self.block_manager.pages_for(len(ids) + 1)
        if pages > self.block_manager.num_pages:
            raise PromptTooLongError(f"prompt of {len(ids)} tokens needs {pages} KV pages; the cache has "
                                     f"{self.block_manager.num_pages}")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        return Sequence(request_id, ids, params, prompt=text, arrival_time=time.monotonic())

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        return self.add_sequence(self.make_sequence(prompt, params, request_id))

    def add_sequence(self, seq: Sequence) -> str:
        if seq.request_id in self.requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; its KV pages are freed at once. Returns its final output."""
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.is_finished:
            return None
        self.scheduler.finish(seq, "abort")
        return self._report(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- stepping
    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Schedule and run one step (or finish the one launched ahead); report every request that
        got a token (stream=True) or only those that finished (stream=False, which skips
        detokenising unfinished ones)."""
        started = time.perf_counter()
        launched, self._pending = self._pending, None
        if launched is not None and all(c.seq.is_finished for c in launched.sampling):
            launched = None                       # every row of the step run ahead was dropped
        if launched is None:
            sched = self.scheduler.schedule()
            self.stats["preemptions"] += len(sched.preempted)
            if sched.is_empty:
                return self._fail_unschedulable()
            launched = self._launch(sched)
        sampling, logits, greedy_ids = self._live_rows(launched)
        seqs = [c.seq for c in sampling]
        tokens, failed = [], {}
        if seqs:
            sampled = self.sampler.sample(logits, seqs, greedy_ids)
            handle = self._readback.start(sampled.tokens)
            if not sampled.failed:
                self._pending = self._launch_ahead(sampling, sampled.feed(), launched.sched.chunks)
            tokens = self._readback.wait(handle)
            failed = sampled.failures(tokens)
        for i, error in failed.items():
            self._fail(seqs[i], error)
        self.stats["steps"] += 1
        self.step_times.observe(step_kind(c.length for c in launched.sched.chunks), time.perf_counter() - started)
        for c in launched.sched.chunks:
            if c.seq.is_finished:                 # aborted while its step ran ahead, or failed now
                continue
            c.seq.num_computed += c.length
            if c.length == 1:
                self.stats["decode_tokens"] += 1
            else:
                self.stats["prefill_tokens"] += c.length
        now = time.monotonic()
        for seq, token in zip(seqs, tokens):
            if seq.is_finished:
                continue
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            try:
                self._check_stop(seq, token)
            except Exception as exc:  # noqa: BLE001 - the request's own stop values
                self._fail(seq, seq.failure("the stop check", exc))
        for c in launched.sched.chunks:
            if not c.seq.is_finished:
                self.block_manager.register_computed(c.seq)
        outputs = [self._report(seq) for seq in seqs if stream or seq.is_finished]
        for seq in seqs:
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        return outputs

    def _launch(self, sched: SchedulerOutput, input_tokens: torch.Tensor | None = None) -> LaunchedStep:
        return LaunchedStep(sched, *self.executor.execute(sched, input_tokens=input_tokens))

    def _live_rows(self, launched: LaunchedStep):
        """The sampling chunks (and their logits / argmax rows) of sequences still running: one
        aborted, or stopped by the step before, while this step ran ahead, samples nothing."""
        sampling = launched.sampling
        live = [i for i, c in enumerate(sampling) if not c.seq.is_finished]
        if len(live) == len(sampling):
            return sampling, launched.logits, launched.greedy
        index = values_to_device(live, torch.long, launched.logits.device)
        greedy = launched.greedy[index] if launched.greedy is not None else None
        return [sampling[i] for i in live], launched.logits[index], greedy

    def _launch_ahead(self, sampling: list[ScheduledChunk], device_tokens: torch.Tensor,
                      step_chunks: list[ScheduledChunk]) -> LaunchedStep | None:
        """Queue the next decode step now, fed with this step's samples on the device, when it is
        certain to be wanted: each sampling sequence continues unless its token turns out to be a
        stop (then its row is dropped); one that reaches max_tokens or the context end now stops."""
        if not self.async_scheduling:
            return None
        for c in sampling:
            if self._ends_next(c.seq):
                return None
        continuing = [c for c in step_chunks if not c.samples and not c.seq.is_finished]   # prompts under way
        sched = self.scheduler.schedule_ahead(sampling, continuing)
        if sched is None:
            return None
        self.stats["steps_ahead"] += 1
        return self._launch(sched, input_tokens=device_tokens)

    def _ends_next(self, seq: Sequence) -> bool:
        """The token about to be read is the request's last by length (or its limits do not read:
        its stop check then fails it)."""
        try:
            p = seq.params
            return (p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens) \
                or seq.num_tokens + 1 >= self.max_model_len
        except Exception:  # noqa: BLE001 - the stop check attributes it
            return True

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """Finish one request with an error: its pages are freed now; a row of it in the step
        running ahead is dropped."""
        seq.error = error
        seq.stop_reason = None
        self.scheduler.finish(seq, "error")
        log.warning("%s", error)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens and token in p.stop_ids(self.cfg.eos_token_id):
            seq.stop_reason = token
            self.scheduler.finish(seq, "stop")
        elif (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _fail_unschedulable(self) -> list[RequestOutput]:
        """Nothing could run: the head of the queue needs more pages than the whole cache has."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        seq = self.scheduler.waiting[0]
        need = self.block_manager.pages_for(seq.num_tokens)
        self._fail(seq, KVCacheExhaustedError(
            f"request {seq.request_id} needs {need} KV pages for {seq.num_tokens} tokens; the cache has "
            f"{self.block_manager.num_pages} pages of {self.block_manager.page_size} tokens"))
        self.requests.pop(seq.request_id, None)
        return [self._report(seq)]

    def _detokenize(self, seq: Sequence, visible: list[int]) -> str:
        """New text since the last call, decoding only a short window (vLLM's incremental scheme):
        text of visible[prefix:] minus text of visible[prefix:read]; a trailing partial character
        is held back until the next token completes it."""
        skip = seq.params.skip_special_tokens
        before = self.tokenizer.decode(visible[seq.detok_prefix:seq.detok_read], skip)
        after = self.tokenizer.decode(visible[seq.detok_prefix:], skip)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not seq.is_finished):
            return ""
        seq.detok_prefix, seq.detok_read = seq.detok_read, len(visible)
        return after[len(before):] if after.startswith(before) else after

    def _report(self, seq: Sequence) -> RequestOutput:
        """The request's output; a failure to detokenise it fails that request alone. A request
        with SamplingParams(detokenize=False) is never detokenised: its text stays "" (vLLM's rule)."""
        try:
            return self._output(seq)
        except Exception as exc:  # noqa: BLE001 - its tokens or its detokenisation options
            self._fail(seq, seq.failure("detokenising the output", exc))
            return self._output(seq, detokenize=False)

    def _output(self, seq: Sequence, detokenize: bool = True) -> RequestOutput:
        out_ids = seq.output_token_ids
        if seq.finish_reason == "stop" and out_ids and out_ids[-1] == seq.stop_reason:
            visible = out_ids[:-1]          # the stop token is not part of the text
        else:
            visible = out_ids
        new_text = self._detokenize(seq, visible) if detokenize and seq.params.detokenize else ""
        seq.text_emitted += new_text
        new_ids = out_ids[seq.num_emitted:]
        seq.num_emitted = len(out_ids)
        completion = CompletionOutput(0, seq.text_emitted, out_ids, new_text, new_ids, seq.finish_reason,
                                      seq.stop_reason)
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time,
                                 time.monotonic() if seq.is_finished else None, seq.num_cached_tokens,
                                 seq.num_preemptions)
        return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), [completion],
                             seq.is_finished, metrics, seq.error)

    def shutdown(self) -> None:
        self.executor.shutdown()
