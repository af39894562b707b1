"""`LLM`: the offline entry point, in vLLM's shape."""
from __future__ import annotations

from typing import Iterator, Sequence

from stepvox.engine.config import EngineConfig
from stepvox.engine.llm_engine import LLMEngine
from stepvox.engine.outputs import RequestOutput
from stepvox.engine.sampling_params import SamplingParams


def _as_prompt_list(prompts) -> list:
    """One prompt (a string or a list of ids) or several, as a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)


class LLM:
    """Load a Step1 model folder and generate from it.

    >>> llm = LLM("Step-Audio-TTS-3B")                       # bf16 on the GPU
    >>> out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    >>> out[0].outputs[0].token_ids, out[0].outputs[0].text
    """

    def __init__(self, model: str, *, dtype="auto", device: str = "auto", tensor_parallel_size: int = 1,
                 **engine_options):
        cfg = EngineConfig(device=device, dtype=dtype, tensor_parallel_size=tensor_parallel_size, **engine_options)
        self.engine = LLMEngine(model, cfg)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _submit(self, prompts, sampling_params) -> list[str]:
        prompts = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence) and not isinstance(sampling_params, SamplingParams):
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        seqs = [self.engine.make_sequence(p, sp) for p, sp in zip(prompts, params)]  # validate all first
        return [self.engine.add_sequence(s) for s in seqs]

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run the prompts to completion; outputs come back in prompt order, one per prompt.

        A request that fails at run time because of itself (a logits processor raises or returns
        NaN, its values cannot be sampled, it outgrows the KV cache) does not stop the batch: its
        output comes back with finish_reason "error", the tokens it had, and the typed error in
        `.error`; the others complete as they would alone. Prompts or params refused when they are
        submitted (InvalidRequestError) raise before anything runs; a fault of the engine raises."""
        ids = self._submit(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(stream=False):
                    final[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [final[rid] for rid in ids]

    def generate_stream(self, prompts, sampling_params=None) -> Iterator[RequestOutput]:
        """Yield each request's outputs as tokens arrive (`new_token_ids`/`new_text` hold the deltas).
        A request that fails at run time ends with an output whose finish_reason is "error" and
        whose `.error` says why (the stream goes on with the others), as in `generate`.
        Closing the iterator early aborts the unfinished requests and frees their KV pages."""
        ids = self._submit(prompts, sampling_params)
        pending = set(ids)
        try:
            while pending and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.engine.abort_request(rid)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
