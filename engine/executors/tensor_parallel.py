"""The driver side of tensor parallelism: rank 0 in this process, ranks 1..N-1 in workers.

Each step the driver broadcasts the step's plan (plain chunk data) over a gloo group, then runs
its own shard; the workers run theirs on the same plan, so no rank can diverge. A decode step
launched ahead (async scheduling) takes its token ids from the previous step's samples on rank 0's
device; they follow the plan in a broadcast on the model's group, so no rank waits for the host. The layers'
all-reduces (NCCL on GPUs) join the ranks inside the forward pass; the LM head gathers the full
logits and the driver samples. A worker that dies is noticed before the next step, or while the
driver waits in a collective, and reported with its rank and its failure.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import socket
import threading
import time
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from ..config import EngineConfig, Step1Config
from ..distributed.parallel_state import init_groups
from ..errors import StepvoxError, WorkerFailedError
from ..model_runner import ModelRunner
from ..scheduler import SchedulerOutput
from .worker import worker_main

# NVLink multicast stays off in every process we start (it can take a shared host's GPUs down)
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_devices(device: torch.device, size: int) -> list[str]:
    if device.type != "cuda":
        return ["cpu"] * size
    first = device.index or 0
    if first + size > torch.cuda.device_count():
        raise StepvoxError(f"tensor_parallel_size {size} from cuda:{first} needs {first + size} GPUs; "
                           f"{torch.cuda.device_count()} are visible")
    return [f"cuda:{first + r}" for r in range(size)]


class TensorParallelExecutor:
    def __init__(self, model_path: str, cfg: Step1Config, ecfg: EngineConfig):
        for k, v in SAFE_NCCL_ENV.items():
            os.environ.setdefault(k, v)
        self.size = ecfg.tensor_parallel_size
        devices = rank_devices(ecfg.resolve_device(), self.size)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.workers, self.conns = [], []
        self._closing = False
        self.failure: str | None = None
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"stepvox-tp{rank}", daemon=True,
                               args=(rank, self.size, init_method, model_path, ecfg, devices[rank], child))
            proc.start()
            child.close()
            self.workers.append(proc)
            self.conns.append(parent)
        atexit.register(self.shutdown)
        self._monitor = threading.Thread(target=self._watch, name="stepvox-tp-monitor", daemon=True)
        self._monitor.start()
        try:
            self.device = torch.device(devices[0])
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            tp, self.control = init_groups(0, self.size, init_method, self.device)
            self.runner = ModelRunner(model_path, cfg, ecfg, self.device, tp)
            for rank, conn in enumerate(self.conns, start=1):
                kind, payload = self._receive(rank, conn)
                if kind != "ready":
                    raise WorkerFailedError(f"tensor-parallel rank {rank} failed while loading:\n{payload}")
        except BaseException as exc:
            failure = self._collect_failure()
            self.shutdown()
            # rank 0's own typed error (a bad config or checkpoint, which every rank meets alike)
            # is the cause; anything else on rank 0 may be a consequence of a worker's failure
            if failure and not isinstance(exc, StepvoxError):
                raise WorkerFailedError(failure) from exc
            raise
        self.num_pages = self.runner.num_pages
        self.sampling_device = self.device

    # ---------------------------------------------------------------- failure handling
    def _receive(self, rank, conn, timeout: float = 3600.0):
        deadline = time.monotonic() + timeout
        proc = self.workers[rank - 1]
        while time.monotonic() < deadline:
            if conn.poll(0.2):
                return conn.recv()
            if not proc.is_alive():
                raise WorkerFailedError(self._collect_failure() or self._describe_exit(rank))
        raise WorkerFailedError(f"tensor-parallel rank {rank} did not report within {timeout:.0f} s")

    def _describe_exit(self, rank: int) -> str:
        proc = self.workers[rank - 1]
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"tensor-parallel rank {rank} (pid {proc.pid}) died: {how}"

    def _collect_failure(self) -> str | None:
        """The first worker failure: its own report if it sent one, else how its process ended."""
        if self.failure:
            return self.failure
        for rank, (proc, conn) in enumerate(zip(self.workers, self.conns), start=1):
            try:
                while conn.poll(0):
                    kind, payload = conn.recv()
                    if kind == "error":
                        self.failure = f"tensor-parallel rank {rank} (pid {proc.pid}) failed:\n{payload}"
                        return self.failure
            except (EOFError, OSError):
                pass
            if not proc.is_alive() and proc.exitcode not in (0, None):
                self.failure = self._describe_exit(rank)
                return self.failure
        return None

    def _watch(self) -> None:
        """Notice a worker's death even while the driver is blocked in a collective, and break the
        collective so the driver raises instead of hanging."""
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.workers, start=1)}
        while sentinels and not self._closing:
            ready = wait(list(sentinels), timeout=0.5)
            for s in ready:
                sentinels.pop(s)
                if not self._closing:
                    self._collect_failure()
                    self._abort_groups()
                    return

    def _abort_groups(self) -> None:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None and dist.is_initialized():
            try:
                abort()
            except Exception:  # noqa: BLE001 - best effort: the gloo path errors out on its own
                pass

    def _check_workers(self) -> None:
        failure = self._collect_failure()
        if failure:
            raise WorkerFailedError(failure)

    # ---------------------------------------------------------------- steps
    # a step planned ahead carries its token ids on rank 0's device: the plan says so, and the ids
    # follow in a broadcast on the model's group (NCCL on GPUs), queued behind the sampling
    def execute(self, sched: SchedulerOutput, input_tokens: torch.Tensor | None = None):
        self._check_workers()
        plans = [c.plan() for c in sched.chunks]
        try:
            if self.workers:           # one rank alone has nobody to tell
                dist.broadcast_object_list([("step", (plans, input_tokens is not None))], src=0, group=self.control)
                if input_tokens is not None:
                    input_tokens = input_tokens.to(device=self.device, dtype=torch.long).contiguous()
                    dist.broadcast(input_tokens, src=0)
            logits, order, greedy = self.runner.execute(plans, input_tokens)
        except Exception as exc:
            failure = self._collect_failure()
            if failure:
                raise WorkerFailedError(failure) from exc
            raise
        return logits, [sched.chunks[i] for i in order], greedy

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        if dist.is_initialized():
            if self.failure is None and all(p.is_alive() for p in self.workers):
                try:
                    dist.broadcast_object_list([("stop", None)], src=0, group=self.control)
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        self.runner = None
