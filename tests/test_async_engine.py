"""The asyncio engine: concurrent requests stream to completion; an abort frees pages at once."""
import asyncio

import pytest

from stepvox import AsyncLLMEngine, LLM, SamplingParams
from stepvox.engine.errors import PromptTooLongError


def test_async_generate_and_abort(tiny_model):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(tiny_model, device="cpu", max_model_len=256, kernel_backend="reference")
    want = llm.generate(["Hello", "world"], params)
    engine = AsyncLLMEngine.from_pretrained(tiny_model, device="cpu", max_model_len=256, page_size=4,
                                            kernel_backend="reference")

    async def collect(prompt):
        tokens = []
        async for out in engine.generate(prompt, params):
            tokens += out.outputs[0].new_token_ids
        return tokens, out

    async def cancelled():
        seen = 0
        async for out in engine.generate("Hello world", SamplingParams(max_tokens=500, ignore_eos=True),
                                         request_id="to-cancel"):
            seen += 1
            if seen == 3:
                await engine.abort("to-cancel")
            if out.finished:
                return out

    async def main():
        return await asyncio.gather(collect("Hello"), collect("world"), cancelled())

    try:
        (a, out_a), (b, _), aborted = asyncio.run(main())
        assert a == want[0].outputs[0].token_ids and out_a.finished
        assert b == want[1].outputs[0].token_ids
        assert aborted.outputs[0].finish_reason == "abort"
        assert len(aborted.outputs[0].token_ids) < 500
        bm = engine.engine.block_manager
        assert bm.num_free_pages == bm.num_pages

        async def too_long():
            async for _ in engine.generate(list(range(10, 400)), params):
                pass
        with pytest.raises(PromptTooLongError):
            asyncio.run(too_long())
    finally:
        engine.shutdown()


def test_consumer_that_stops_listening_frees_its_request(tiny_model):
    engine = AsyncLLMEngine.from_pretrained(tiny_model, device="cpu", max_model_len=256, kernel_backend="reference")

    async def main():
        agen = engine.generate("Hello", SamplingParams(max_tokens=400, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not engine.engine.has_unfinished_requests():
                return True
        return False
    try:
        assert asyncio.run(main())
        bm = engine.engine.block_manager
        assert bm.num_free_pages == bm.num_pages
    finally:
        engine.shutdown()
