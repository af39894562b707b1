"""stepvox.engine: the runtime (models, layers, KV cache, scheduler, model runner, workers)."""
