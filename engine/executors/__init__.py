"""Executors run a scheduled step on the model's device(s) and hand back logits for sampling.

Both take `(model_path, model_config, engine_config)` and offer `num_pages`, `sampling_device`,
`execute(scheduler_output, input_tokens=None)` and `shutdown()`. `execute` queues the step and
returns device tensors without waiting for them; `input_tokens` (a device tensor) feeds a decode
step planned ahead (LLMEngine's async scheduling) with the previous step's samples.

- LocalExecutor: one process, one device.
- TensorParallelExecutor: rank 0 in this process, ranks 1..N-1 in worker processes (worker.py),
  joined by a process group of its own (no process-wide state), so executors of any sizes coexist.

`shutdown()` releases everything the executor made and may be called more than once; `execute`
after it raises EngineDeadError.
"""
from __future__ import annotations

from ..config import EngineConfig, Step1Config
from .local import LocalExecutor
from .tensor_parallel import TensorParallelExecutor


def create_executor(model_path: str, cfg: Step1Config, ecfg: EngineConfig):
    """The executor the engine options ask for: worker processes for tensor parallelism (or when
    `distributed_executor="mp"`), else this process."""
    if ecfg.tensor_parallel_size > 1 or ecfg.distributed_executor == "mp":
        return TensorParallelExecutor(model_path, cfg, ecfg)
    return LocalExecutor(model_path, cfg, ecfg)


__all__ = ["LocalExecutor", "TensorParallelExecutor", "create_executor"]
