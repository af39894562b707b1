"""The driver side of tensor parallelism: rank 0 in this process, ranks 1..N-1 in workers.

Each step the driver sends the step's plan (plain chunk data) down every worker's pipe, then runs
its own shard; the workers run theirs on the same plan, so no rank can diverge. A decode step
launched ahead (async scheduling) takes its token ids from the previous step's samples on rank 0's
device; they follow the plan in a broadcast on the model's group, so no rank waits for the host.
The layers' all-reduces (NCCL on GPUs, gloo on CPUs) join the ranks inside the forward pass; the
LM head gathers the full logits and the driver samples.

The process group belongs to this executor (its own store and backend, see RankGroup), so engines
of any sizes coexist in one process and shutting one down releases everything it made. The pipes
are the control channel, and the driver never blocks where a dead worker would hang it: it joins
the group only after every worker has said over its pipe that it runs, it waits on the pipes and
the processes' exits together, and it stops workers with a message, never a collective. A worker
that dies is reported as WorkerFailedError with its rank and its own traceback or its exit.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing.connection import wait

import torch

from ..config import EngineConfig, Step1Config
from ..distributed.parallel_state import RankGroup, TPGroup, serve_store
from ..errors import EngineDeadError, StepvoxError, WorkerFailedError
from ..model_runner import ModelRunner
from ..scheduler import SchedulerOutput
from .worker import worker_main

# NVLink multicast stays off in every process we start (it can take a shared host's GPUs down)
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

NO_MAIN_GUARD_EXIT = 78          # a spawned process that met an engine while importing __main__
JOIN_TIMEOUT = 300.0             # a live worker's interpreter start and imports (seconds)
LOAD_TIMEOUT = 3600.0            # a live worker's share of the checkpoint
FAILURE_GRACE = 5.0              # after a collective fails: time for the worker's death to show
SETTLE = 0.3                     # after one worker's death: time for the others' to show
POLL = 0.01                      # an exit shows in waitpid a moment after the process's pipes close
STOP_WAIT = 5.0                  # a worker told to stop exits well within this
KILL_WAIT = 2.0                  # after SIGTERM, before SIGKILL
WATCH_PERIOD = 0.1               # how often the monitor looks whether shutdown began


def _main_file() -> str:
    # a spawned process imports the script before naming it __main__, but has its argv already
    named = getattr(sys.modules.get("__main__"), "__file__", None)
    return named or (sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else "the main script")


def no_main_guard_hint() -> str:
    return (f"worker processes are spawned, and a spawned process imports the main module "
            f"({_main_file()}) before it runs; that import created another engine. Put the code that "
            f"creates the engine under `if __name__ == \"__main__\":` in that script.")


def refuse_in_bootstrap() -> None:
    """An engine created while this process, itself spawned, imports the parent's main module
    means the script has no `__main__` guard: starting workers from here would only fail with
    multiprocessing's bootstrapping error, which the driver never sees. Exit with a code the
    driver recognises instead (the test is multiprocessing's own)."""
    if getattr(mp.current_process(), "_inheriting", False):
        sys.stderr.write(f"stepvox: {no_main_guard_hint()}\n")
        raise SystemExit(NO_MAIN_GUARD_EXIT)


def rank_devices(device: torch.device, size: int, share: bool = False) -> list[str]:
    if device.type != "cuda":
        return ["cpu"] * size
    if share:       # an index, always: workers set it as their device, and the ranks compare it
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [f"cuda:{index}"] * size
    first = device.index or 0
    if first + size > torch.cuda.device_count():
        raise StepvoxError(f"tensor_parallel_size {size} from cuda:{first} needs {first + size} GPUs; "
                           f"{torch.cuda.device_count()} are visible")
    return [f"cuda:{first + r}" for r in range(size)]


class TensorParallelExecutor:
    def __init__(self, model_path: str, cfg: Step1Config, ecfg: EngineConfig):
        refuse_in_bootstrap()
        for k, v in SAFE_NCCL_ENV.items():
            os.environ.setdefault(k, v)
        self.size = ecfg.tensor_parallel_size
        devices = rank_devices(ecfg.resolve_device(), self.size, ecfg.tensor_parallel_share_device)
        self.device = torch.device(devices[0])
        self.workers: list[mp.Process] = []
        self.conns = []
        self.failure: str | None = None
        self.runner: ModelRunner | None = None
        self._store = None
        self._group: RankGroup | None = None
        self._joined: set[int] = set()
        self._reports: dict[int, tuple[float, str]] = {}   # rank -> (when, traceback) of its failure
        self._closed = False
        self._ready = False              # every worker is in its loop, reading the pipe
        self._step_open = False          # rank 0 left a step partway: the workers may be inside it
        self._stop_watch = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="stepvox-tp-monitor", daemon=True)
        atexit.register(self.shutdown)
        try:
            self._start(model_path, cfg, ecfg, devices)
        except BaseException as exc:
            # rank 0's own typed error (a bad config or checkpoint, which every rank meets alike)
            # is the cause; another error on rank 0 may be a consequence of a worker's failure
            consequence = isinstance(exc, Exception) and not isinstance(exc, StepvoxError)
            failure = self._await_failure(FAILURE_GRACE) if consequence else None
            self.shutdown()
            if failure:
                raise WorkerFailedError(failure) from exc
            raise
        self.num_pages = self.runner.num_pages
        self.sampling_device = self.device

    def _start(self, model_path: str, cfg: Step1Config, ecfg: EngineConfig, devices: list[str]) -> None:
        ctx = mp.get_context("spawn")
        if self.size > 1:
            self._store = serve_store()
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"stepvox-tp{rank}", daemon=True,
                               args=(rank, self.size, self._store.port, model_path, ecfg, devices[rank], child))
            try:
                proc.start()
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
            self.workers.append(proc)
            self.conns.append(parent)
        self._monitor.start()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._receive_all("joined", JOIN_TIMEOUT)
        tp = TPGroup()
        if self.size > 1:
            self._group = RankGroup(self._store, 0, self.size, self.device, custom_all_reduce=ecfg.custom_all_reduce,
                                    share_device=ecfg.tensor_parallel_share_device)
            self._store = None           # the group holds it now, and releases it on close
            tp = TPGroup(0, self.size, self._group)
        self.runner = ModelRunner(model_path, cfg, ecfg, self.device, tp)
        self._receive_all("ready", LOAD_TIMEOUT)
        self._ready = True

    # ---------------------------------------------------------------- the control channel
    def _send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            conn.send_bytes(data)

    def _receive_all(self, kind: str, timeout: float) -> None:
        for rank in range(1, self.size):
            got, payload = self._receive(rank, timeout)
            if got == "error":
                self._reports[rank] = payload
                raise WorkerFailedError(self._await_failure(FAILURE_GRACE))
            if got != kind:
                raise WorkerFailedError(f"tensor-parallel rank {rank} sent {got!r} where {kind!r} was due")

    def _receive(self, rank: int, timeout: float):
        """The next message of a worker, waiting while every worker lives."""
        conn = self.conns[rank - 1]
        sentinels = [p.sentinel for p in self.workers]
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailedError(f"tensor-parallel rank {rank} did not report within {timeout:.0f} s")
            ready = wait([conn, *sentinels], timeout=left)
            if any(s in ready for s in sentinels):
                raise WorkerFailedError(self._await_failure(FAILURE_GRACE))
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):       # its end closed: the process is exiting
                    raise WorkerFailedError(self._await_failure(FAILURE_GRACE)) from None
                if message[0] == "joined":
                    self._joined.add(rank)
                return message

    # ---------------------------------------------------------------- failure handling
    def _exited(self) -> list[int]:
        return [rank for rank, p in enumerate(self.workers, start=1) if p.exitcode is not None]

    def _await_failure(self, grace: float) -> str | None:
        """Wait up to `grace` s for a worker to exit (a failing worker reports, then exits), let the
        others' exits show for a moment, then say which failure came first."""
        if self.failure or not self.workers:
            return self.failure
        deadline = time.monotonic() + grace
        while not self._exited() and time.monotonic() < deadline:
            time.sleep(POLL)
        settled = time.monotonic() + SETTLE
        while 0 < len(self._exited()) < len(self.workers) and time.monotonic() < settled:
            time.sleep(POLL)
        return self._collect_failure()

    def _report(self, rank: int, payload) -> str:
        _, trace = payload
        return f"tensor-parallel rank {rank} (pid {self.workers[rank - 1].pid}) failed:\n{trace}"

    def _describe_exit(self, rank: int) -> str:
        proc = self.workers[rank - 1]
        code = proc.exitcode
        head = f"tensor-parallel rank {rank} (pid {proc.pid})"
        if code == NO_MAIN_GUARD_EXIT:
            return f"{head} could not start: {no_main_guard_hint()}"
        if code is not None and code < 0:
            return f"{head} died: killed by signal {-code} ({signal.Signals(-code).name})"
        if rank not in self._joined:
            return f"{head} exited with code {code} before it started (its traceback, if any, is on stderr)"
        return f"{head} died: exit code {code}"

    def _collect_failure(self) -> str | None:
        """The failure that came first: a worker killed from outside, else the earliest report
        (the others' collectives fail after it), else an exit with no report."""
        if self.failure:
            return self.failure
        reports = self._reports
        for rank, conn in enumerate(self.conns, start=1):
            try:
                while conn.poll(0):
                    kind, payload = conn.recv()
                    if kind == "joined":
                        self._joined.add(rank)
                    elif kind == "error":
                        reports[rank] = payload
            except (EOFError, OSError):
                pass
        exited = self._exited()
        killed = [r for r in exited if self.workers[r - 1].exitcode < 0]
        unreported = [r for r in exited if r not in reports]
        if killed:
            self.failure = self._describe_exit(killed[0])
        elif reports:
            first = min(reports, key=lambda r: reports[r][0])
            self.failure = self._report(first, reports[first])
        elif unreported:
            self.failure = self._describe_exit(unreported[0])
        return self.failure

    def _watch(self) -> None:
        """A worker's death breaks a collective the driver may be blocked in (NCCL would wait)."""
        sentinels = [p.sentinel for p in self.workers]
        while sentinels and not self._stop_watch.is_set():
            if wait(sentinels, timeout=WATCH_PERIOD):
                if not self._stop_watch.is_set() and self._group is not None:
                    self._group.abort()
                return

    def _check_workers(self) -> None:
        if self._closed:
            raise EngineDeadError("the tensor-parallel executor was shut down")
        if self.failure or self._exited():
            raise WorkerFailedError(self._await_failure(FAILURE_GRACE))
        if self._step_open:
            raise EngineDeadError("a step was left partway on rank 0 (interrupted or failed), so the ranks "
                                  "are out of step; shut the engine down and create a new one")

    # ---------------------------------------------------------------- steps
    # a step planned ahead carries its token ids on rank 0's device: the plan says so, and the ids
    # follow in a broadcast on the model's group (NCCL on GPUs), queued behind the sampling
    def execute(self, sched: SchedulerOutput, input_tokens: torch.Tensor | None = None):
        self._check_workers()
        plans = [c.plan() for c in sched.chunks]
        self._step_open = True
        try:
            if self.workers:           # one rank alone has nobody to tell
                self._send(("step", (plans, input_tokens is not None)))
                if input_tokens is not None:
                    input_tokens = input_tokens.to(device=self.device, dtype=torch.long).contiguous()
                    self._group.broadcast(input_tokens, src=0)
            logits, order, greedy = self.runner.execute(plans, input_tokens)
        except Exception as exc:
            failure = self._await_failure(FAILURE_GRACE)
            if failure:
                raise WorkerFailedError(failure) from exc
            raise
        self._step_open = False
        return logits, [sched.chunks[i] for i in order], greedy

    # ---------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Stop every rank within seconds and release what the executor made (processes, pipes,
        the group's threads and sockets, the monitor thread, the atexit entry)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._stop_watch.set()
        if self._monitor.is_alive() and self._monitor is not threading.current_thread():
            self._monitor.join()
        # a worker still loading or inside a step would not read the message: nothing to wait for
        healthy = self._ready and not self._step_open and self.failure is None and not self._exited()
        if healthy and self.workers:
            try:
                self._send(("stop", None))
            except OSError:
                healthy = False
        self._reap(STOP_WAIT if healthy else 0.0)
        if self._group is not None:
            self._group.close(graceful=healthy)
        for conn in self.conns:
            conn.close()
        for proc in self.workers:
            proc.close()
        self.workers, self.conns = [], []
        self._group = self._store = self.runner = None

    def _reap(self, wait_s: float) -> None:
        """Join the workers within `wait_s` s, then SIGTERM those left, then SIGKILL."""
        self._join_all(wait_s)
        for proc in self.workers:
            if proc.exitcode is None:
                proc.terminate()
        self._join_all(KILL_WAIT)
        for proc in self.workers:
            if proc.exitcode is None:
                proc.kill()
                proc.join()

    def _join_all(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        for proc in self.workers:
            proc.join(max(0.0, deadline - time.monotonic()))
