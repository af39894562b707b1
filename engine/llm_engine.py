"""The synchronous engine: requests in, one scheduled step at a time, outputs out."""
from __future__ import annotations

import itertools
import logging
import time

import torch

from .config import EngineConfig, Step1Config, resolve_dtype
from .errors import ConfigError, InvalidRequestError, KVCacheExhaustedError, PromptTooLongError
from .kv_cache import BlockManager
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import Step1Tokenizer

log = logging.getLogger("stepvox")


class LLMEngine:
    def __init__(self, model_path: str, engine_config: EngineConfig | None = None, executor=None):
        self.ecfg = engine_config or EngineConfig()
        self.ecfg.validate()
        self.model_path = model_path
        self.cfg = Step1Config.from_folder(model_path)
        self.device = self.ecfg.resolve_device()
        self.dtype = resolve_dtype(self.ecfg.dtype, self.device)
        self.max_model_len = self.ecfg.max_model_len or self.cfg.max_seq_len
        if self.max_model_len > self.cfg.max_seq_len:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        self.tokenizer = Step1Tokenizer.from_folder(model_path, self.cfg.vocab_size)
        if executor is None:
            if self.ecfg.tensor_parallel_size > 1 or self.ecfg.distributed_executor == "mp":
                from .distributed.executor import TensorParallelExecutor
                executor = TensorParallelExecutor(model_path, self.ecfg)
            else:
                from .executor import LocalExecutor
                executor = LocalExecutor(model_path, self.cfg, self.ecfg, self.device, self.dtype, self.max_model_len)
        self.executor = executor
        self.block_manager = BlockManager(executor.num_pages, self.ecfg.page_size, self.ecfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.ecfg.max_num_seqs, self.ecfg.max_num_batched_tokens)
        self.sampler = Sampler(executor.sampling_device, self.cfg.eos_token_id, self.ecfg.seed)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "preemptions": 0}

    # ---------------------------------------------------------------- requests
    def make_sequence(self, prompt, params: SamplingParams | None, request_id: str | None = None) -> Sequence:
        """Validate a request and build its sequence (does not queue it)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_bos=True)
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            text, ids = None, [int(t) for t in prompt]
        else:
            raise InvalidRequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        self.tokenizer.check_ids(ids)
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.cfg.vocab_size]
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
        return self._output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- stepping
    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Schedule and run one step; report every request that got a token (stream=True) or
        only those that finished (stream=False, which skips detokenising unfinished ones)."""
        sched = self.scheduler.schedule()
        self.stats["preemptions"] += len(sched.preempted)
        if sched.is_empty:
            return self._fail_unschedulable()
        logits, sampling, greedy_ids = self.executor.execute(sched)
        self.stats["steps"] += 1
        for c in sched.chunks:
            c.seq.num_computed += c.length
            if c.length == 1:
                self.stats["decode_tokens"] += 1
            else:
                self.stats["prefill_tokens"] += c.length
        seqs = [c.seq for c in sampling]
        tokens = self.sampler(logits, seqs, greedy_ids) if seqs else []
        now = time.monotonic()
        reported = []
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._check_stop(seq, token)
            reported.append(seq)
        for c in sched.chunks:
            if not c.seq.is_finished:
                self.block_manager.register_computed(c.seq)
        outputs = [self._output(seq) for seq in reported if stream or seq.is_finished]
        for seq in reported:
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        return outputs

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
        seq.error = KVCacheExhaustedError(
            f"request {seq.request_id} needs {need} KV pages for {seq.num_tokens} tokens; the cache has "
            f"{self.block_manager.num_pages} pages of {self.block_manager.page_size} tokens")
        self.scheduler.finish(seq, "error")
        self.requests.pop(seq.request_id, None)
        log.warning("%s", seq.error)
        return [self._output(seq)]

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

    def _output(self, seq: Sequence) -> RequestOutput:
        out_ids = seq.output_token_ids
        if seq.finish_reason == "stop" and out_ids and out_ids[-1] == seq.stop_reason:
            visible = out_ids[:-1]          # the stop token is not part of the text
        else:
            visible = out_ids
        new_text = self._detokenize(seq, visible)
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
