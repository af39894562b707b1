"""stepvox.engine.device: the mechanisms every GPU-running layer shares: CUDA-graph caches with
their length buckets, and host-to-device staging that never waits for the GPU."""
