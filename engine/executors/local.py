"""The executor of one process and one device (tensor_parallel_size 1)."""
from __future__ import annotations

import torch

from ..config import EngineConfig, Step1Config
from ..errors import ConfigError, EngineDeadError
from ..model_runner import ModelRunner
from ..scheduler import SchedulerOutput


class LocalExecutor:
    def __init__(self, model_path: str, cfg: Step1Config, ecfg: EngineConfig):
        if ecfg.tensor_parallel_size != 1:
            raise ConfigError("LocalExecutor runs tensor_parallel_size 1 only")
        device = ecfg.resolve_device()
        self.runner = ModelRunner(model_path, cfg, ecfg, device)
        self.num_pages = self.runner.num_pages
        self.sampling_device = device

    def execute(self, sched: SchedulerOutput, input_tokens: torch.Tensor | None = None):
        if self.runner is None:
            raise EngineDeadError("the executor was shut down")
        logits, order, greedy = self.runner.execute([c.plan() for c in sched.chunks], input_tokens)
        return logits, [sched.chunks[i] for i in order], greedy

    def shutdown(self) -> None:
        self.runner = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
