"""Tensor parallelism's process groups and collectives (the executors in engine/executors/ run
the ranks)."""
