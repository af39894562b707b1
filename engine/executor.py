"""Executors run a scheduled step on the model's device(s) and hand back logits for sampling.

LocalExecutor: one process, one device. The tensor-parallel executor (engine/distributed) keeps
the same interface: `num_pages`, `sampling_device`, `supports_async_scheduling`,
`execute(scheduler_output, input_tokens=None)`, `shutdown()`. execute queues the step and returns
device tensors without waiting for them; input_tokens (a device tensor) feeds a decode step planned
ahead (LLMEngine's async scheduling) with the previous step's samples.
"""
from __future__ import annotations

import torch

from .model_runner import ModelRunner
from .scheduler import SchedulerOutput


class LocalExecutor:
    def __init__(self, model_path, cfg, ecfg, device, dtype, max_model_len):
        if ecfg.tensor_parallel_size != 1:
            raise ValueError("LocalExecutor runs tensor_parallel_size 1 only")
        self.runner = ModelRunner(model_path, cfg, ecfg, device, dtype, max_model_len)
        self.num_pages = self.runner.num_pages
        self.sampling_device = device
        self.supports_async_scheduling = True

    def execute(self, sched: SchedulerOutput, input_tokens: torch.Tensor | None = None):
        logits, order, greedy = self.runner.execute([c.plan() for c in sched.chunks], input_tokens)
        return logits, [sched.chunks[i] for i in order], greedy

    def shutdown(self) -> None:
        self.runner = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
