"""stepvox.engine: the runtime. The LLM engine's modules sit at this level (sequence, kv_cache,
scheduler, model_runner, sampler, llm_engine, async_engine) with the facts every layer shares
(errors, special_tokens, config); the layers below are in layers/, models/, frontend/ and
device/, the audio front ends in audio/, the executors in executors/ (see the README's layout)."""
