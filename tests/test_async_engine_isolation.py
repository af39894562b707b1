"""One bad request never harms another: requests whose logits processors raise fail alone with a
typed error, free their pages at once, and leave the others' tokens unchanged; only a fault of the
engine itself stops AsyncLLMEngine, and then every waiter learns it at once."""
import asyncio
import time

import pytest

from stepvox import AsyncLLMEngine, SamplingParams
from stepvox.engine.errors import EngineDeadError, InvalidRequestError

OPTIONS = dict(device="cpu", kernel_backend="reference", max_model_len=64, page_size=4, num_kv_pages=40,
               max_num_batched_tokens=64)


def _prompt(i):
    return [200 + (37 * i) % 3000 + j for j in range(3 + i % 5)]


def _good(i):
    """Greedy and seeded sampling alternate; both give the same tokens whatever the batch."""
    if i % 2:
        return SamplingParams(temperature=0.8, top_k=20, seed=1000 + i, max_tokens=4 + i % 3, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=4 + i % 3, ignore_eos=True)


def _raise_after(n):
    def processor(output_ids, logits):
        if len(output_ids) >= n:
            raise ValueError(f"boom at {len(output_ids)}")
        return logits
    return processor


def _bad(i):
    """A processor that raises at the first token or a few tokens in (the request then holds pages
    and a row of the step running ahead)."""
    return SamplingParams(temperature=0 if i % 2 else 0.7, seed=i, max_tokens=6, ignore_eos=True,
                          logits_processors=[_raise_after(i % 4)])


async def _collect(engine, prompt, params, request_id):
    tokens, last = [], None
    try:
        async for out in engine.generate(prompt, params, request_id=request_id):
            tokens += out.outputs[0].new_token_ids
            last = out
    except InvalidRequestError as error:
        return "error", error
    return tokens, last.outputs[0].finish_reason


def _run(engine, requests):
    async def main():
        return await asyncio.gather(*(_collect(engine, p, sp, rid) for rid, p, sp in requests))
    return dict(zip((rid for rid, _, _ in requests), asyncio.run(main())))


def test_raising_processors_fail_alone_on_a_contended_cache(tiny_model):
    good = [(f"good-{i}", _prompt(i), _good(i)) for i in range(200)]
    bad = [(f"bad-{i}", _prompt(1000 + i), _bad(i)) for i in range(50)]
    mixed = []
    for i, request in enumerate(good):          # a bad request after every fourth good one
        mixed.append(request)
        if i % 4 == 3:
            mixed.append(bad[i // 4])

    alone = AsyncLLMEngine.from_pretrained(tiny_model, **OPTIONS)
    try:
        want = _run(alone, good)
    finally:
        alone.shutdown()
    engine = AsyncLLMEngine.from_pretrained(tiny_model, **OPTIONS)
    try:
        got = _run(engine, mixed)
        for rid, _, _ in good:
            assert got[rid] == want[rid], rid
        for i, (rid, _, _) in enumerate(bad):
            kind, error = got[rid]
            assert kind == "error" and isinstance(error, InvalidRequestError)
            assert f"logits processor #0 of request {rid} raised ValueError: boom at {i % 4}" in str(error)
        bm = engine.engine.block_manager
        assert not engine.engine.has_unfinished_requests() and not engine.engine.requests
        assert bm.num_free_pages == bm.num_pages and sum(bm.ref_counts) == 0
        assert engine.engine.stats["preemptions"] > 0          # the cache was contended
        # still serving
        again = _run(engine, [("after", _prompt(3), _good(3))])
        assert again["after"] == want["good-3"]
    finally:
        engine.shutdown()


def _slow(output_ids, logits):
    time.sleep(0.01)                  # keeps requests running while the test acts
    return logits


SLOW = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, logits_processors=[_slow])


def test_engine_fault_ends_every_waiter_at_once(tiny_model):
    engine = AsyncLLMEngine.from_pretrained(tiny_model, **OPTIONS)

    async def waiter(i, first):
        async for _ in engine.generate(_prompt(i), SLOW):
            first.set()
        return "finished"

    def lost(*args, **kwargs):
        raise RuntimeError("device lost")

    async def main():
        first = asyncio.Event()
        tasks = [asyncio.create_task(waiter(i, first)) for i in range(6)]
        await first.wait()
        engine.engine.executor.execute = lost      # the next step's launch fails: an engine fault
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        return results, time.monotonic() - t0

    try:
        results, waited = asyncio.run(main())
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "RuntimeError: device lost" in str(results[0])
        assert waited < 5

        async def later():
            async for _ in engine.generate(_prompt(1), SamplingParams(max_tokens=2)):
                pass
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="device lost"):
            asyncio.run(later())
        assert time.monotonic() - t0 < 1
    finally:
        engine.shutdown()


def test_shutdown_ends_open_streams(tiny_model):
    engine = AsyncLLMEngine.from_pretrained(tiny_model, **OPTIONS)

    async def main():
        agen = engine.generate(_prompt(2), SLOW)
        await agen.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            while True:
                out = await asyncio.wait_for(agen.__anext__(), timeout=10)
                assert not out.finished
    asyncio.run(main())
