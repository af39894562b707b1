"""Tensor-parallel process groups and the collectives the layers call.

A TPGroup is an object handed to the model at construction, not process-wide state: layers never
talk to torch.distributed directly but call `tp.all_reduce` / `tp.gather_logits`, so a faster
all-reduce (custom_all_reduce.py) replaces NCCL's in one place, and a one-rank model carries
`TPGroup()` and no group at all.

The ranks of one engine meet in a RankGroup: a store the driver serves on a port of its own and a
gloo (CPU) or NCCL (GPU) backend constructed on it directly. Ranks that share one GPU (NCCL refuses
two ranks on a device) take gloo over host copies instead, and the custom all-reduce, which serves
ranks on one device, for the activations' sums. torch.distributed's default group and
its registry of groups are never touched, so engines of any sizes live side by side in one process,
and closing a RankGroup releases its threads and sockets.
"""
from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

from ..errors import EngineDeadError
from .custom_all_reduce import CustomAllReduce, load

# joining happens once every rank has said it is alive, so a short bound only catches a rank
# killed in between; collectives wait for the slowest rank (weights load at different speeds)
RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=120)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=600)
LOOPBACK = "127.0.0.1"


def serve_store() -> dist.TCPStore:
    """The driver's store, on a port the OS picks (read it from `.port`); it waits for nobody."""
    return dist.TCPStore(LOOPBACK, 0, None, True, RENDEZVOUS_TIMEOUT, wait_for_workers=False)


def connect_store(port: int) -> dist.TCPStore:
    return dist.TCPStore(LOOPBACK, port, None, False, RENDEZVOUS_TIMEOUT)


class RankGroup:
    """One engine's ranks, joined through that engine's store. Constructing it is a rendezvous:
    every rank must construct it (NCCL connects here too, not in the first collective). With
    `custom_all_reduce` on a GPU and stepvox._C built, sums of tensors the custom kernels take run
    there (custom_all_reduce.py), the rest through NCCL."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device,
                 custom_all_reduce: bool = False, share_device: bool = False):
        """share_device: every rank is on this one GPU; collectives the custom all-reduce does not
        take run through gloo on host copies (not capturable: such an engine runs eagerly)."""
        self.rank, self.size = rank, size
        self.custom: CustomAllReduce | None = None
        self.host_staged = device.type == "cuda" and share_device
        prefixed = dist.PrefixStore("tp", store)
        if device.type == "cuda" and not share_device:
            options = dist.ProcessGroupNCCL.Options()
            options.is_high_priority_stream = False
            options._timeout = COLLECTIVE_TIMEOUT
            options.global_ranks_in_group = list(range(size))
            options.group_name = "stepvox-tp"
            backend = dist.ProcessGroupNCCL(prefixed, rank, size, options)
            backend.eager_connect_single_device(device)
        else:
            backend = dist.ProcessGroupGloo(prefixed, rank, size, RENDEZVOUS_TIMEOUT)
            backend.set_timeout(COLLECTIVE_TIMEOUT)
        self._store, self._backend = store, backend
        if custom_all_reduce and device.type == "cuda" and load() is None:
            self.custom = CustomAllReduce(dist.PrefixStore("car", store), rank, size, device,
                                          shared_device=share_device)

    def _live(self):
        if self._backend is None:
            raise EngineDeadError("the tensor-parallel group was closed (the engine was shut down)")
        return self._backend

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        if self.custom is not None and op == dist.ReduceOp.SUM and self._live() and self.custom.try_all_reduce_(x):
            return
        options = dist.AllreduceOptions()
        options.reduceOp = op
        self._in_place(x, lambda t: self._live().allreduce([t], options).wait())

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> torch.Tensor:
        """The custom all-reduce's fused sum + residual add + RMSNorm (see fuses_add_rms_norm)."""
        self._live()
        return self.custom.all_reduce_add_rms_norm(x, residual, weight, eps)

    def fuses_add_rms_norm(self, x: torch.Tensor) -> bool:
        """Whether sums of tensors like x (rows of the hidden size) take the fused kernel."""
        return self.custom is not None and x.dim() == 2 and self.custom.route(x) != "nccl"

    def all_gather(self, parts: list[torch.Tensor], x: torch.Tensor) -> None:
        if self.host_staged:
            staged = [torch.empty_like(p, device="cpu") for p in parts]
            self._live().allgather([staged], [x.cpu()]).wait()
            for p, s in zip(parts, staged):
                p.copy_(s)
            return
        self._live().allgather([parts], [x]).wait()

    def broadcast(self, x: torch.Tensor, src: int = 0) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = src
        self._in_place(x, lambda t: self._live().broadcast([t], options).wait())

    def _in_place(self, x: torch.Tensor, collective) -> None:
        """collective(t) on x itself, or on a host copy written back (ranks sharing a GPU meet in gloo)."""
        if not self.host_staged:
            collective(x)
            return
        staged = x.cpu()
        collective(staged)
        x.copy_(staged)

    def abort(self) -> None:
        """Break collectives blocked on a dead rank (NCCL would wait for ever; gloo notices the
        closed socket itself). Callable from another thread."""
        backend = self._backend
        if backend is not None:
            try:
                backend.abort()
            except RuntimeError:        # a backend without abort: its collectives fail on their own
                pass

    def close(self, graceful: bool = True) -> None:
        """Release the backend and the store (threads, sockets); later collectives raise. Not
        graceful when a rank died or stopped inside a collective: abort rather than finish."""
        backend, self._backend, self._store = self._backend, None, None
        custom, self.custom = self.custom, None
        if custom is not None and graceful:     # after a rank died its kernel may spin: leave the buffer
            custom.close()
        if backend is not None:
            try:
                if graceful:
                    backend.shutdown()
                else:
                    backend.abort()
            except RuntimeError:        # a peer gone, or no abort in this backend: nothing to finish
                pass


@dataclasses.dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: RankGroup | None = None      # the engine's RankGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the tensor-parallel ranks, in place."""
        if self.size > 1:
            self.group.all_reduce(x)
        return x

    def fuses_add_rms_norm(self, x: torch.Tensor) -> bool:
        """Whether the layers leave the row-parallel sums of a step with hidden states like x to the
        norms after them (one fused kernel per sum: all-reduce + residual add + RMSNorm). Every
        rank answers alike: it depends on x's shape and dtype only."""
        return self.size > 1 and self.group.fuses_add_rms_norm(x)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> torch.Tensor:
        """residual += the sum of x over the ranks (in place); returns RMSNorm(residual) * weight."""
        return self.group.all_reduce_add_rms_norm(x, residual, weight, eps)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's vocabulary slice of the logits along the last dim (all ranks get them)."""
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self.group.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest of an integer over the ranks (e.g. KV pages each rank has room for)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        self.group.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
