"""The custom all-reduce of tensor-parallel decode (csrc/custom_all_reduce.cu, built as stepvox._C).

Each rank allocates one buffer region and shares it with the others through a CUDA IPC handle
(exchanged through the engine's store); an all-reduce copies the input into the rank's own region
and one kernel sums every rank's data in rank order, so every rank gets identical bits. Messages up
to `one_shot_max_bytes` take the one-shot kernel (every rank sums everything), larger ones up to
the buffer's capacity the two-shot kernel (reduce-scatter, then all-gather); beyond the capacity,
or for a tensor the kernels do not take, the caller's NCCL all-reduce runs (`route`).

The extension is optional: the project installs and runs without a CUDA toolkit, and `load()`
says once why it is absent. Build it with CMake (README: "The CUDA extension").
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("stepvox")

MAX_RANKS = 8                     # the kernels' flag arrays (csrc/custom_all_reduce.cu kMaxRanks)
MAX_BLOCKS = 64                   # the kernels' largest grid (kMaxBlocks)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_CAPACITY = 8 << 20        # bytes of one rank's data area
DEFAULT_ONE_SHOT_MAX = 256 << 10  # one-shot up to here: every rank reads all the data, but one barrier fewer


def extension_path() -> str:
    """Where CMake writes the extension: python/stepvox/_C.so, beside the package's modules."""
    package = importlib.util.find_spec("stepvox").submodule_search_locations[0]
    return os.path.join(package, "_C.so")


@functools.lru_cache(maxsize=1)
def load() -> str | None:
    """Load stepvox._C's ops once per process; None when loaded, else why not (logged once)."""
    path = extension_path()
    if not os.path.exists(path):
        reason = f"the CUDA extension is not built ({path} is missing); tensor-parallel all-reduces use NCCL"
    else:
        try:
            torch.ops.load_library(path)
            return None
        except (OSError, RuntimeError) as exc:
            reason = f"the CUDA extension at {path} does not load ({exc}); tensor-parallel all-reduces use NCCL"
    log.info(reason)
    return reason


def route(tensor: torch.Tensor, capacity: int, one_shot_max: int) -> str:
    """Which all-reduce a tensor takes: "one_shot", "two_shot", or "nccl" (too large, not a dtype
    the kernels take, not contiguous, or not a whole number of 16-byte vectors)."""
    nbytes = tensor.numel() * tensor.element_size()
    if (tensor.dtype not in DTYPES or not tensor.is_contiguous() or nbytes == 0 or nbytes % 16
            or nbytes > capacity):
        return "nccl"
    return "one_shot" if nbytes <= one_shot_max else "two_shot"


class CustomAllReduce:
    """One rank's side: its region, the peers' regions opened, and the all-reduce calls. Every rank
    of the group must construct it together (the handle exchange waits for all)."""

    def __init__(self, store: dist.Store, rank: int, world: int, device: torch.device,
                 capacity: int = DEFAULT_CAPACITY, one_shot_max: int = DEFAULT_ONE_SHOT_MAX, shared_device: bool = False):
        """shared_device: every rank on this one GPU. Their kernels spin until all ranks' blocks
        arrive; time-sliced contexts take turns, but concurrent ones (MPS) need every rank's grid
        resident at once, so each grid is capped at the SMs / ranks."""
        if not 2 <= world <= MAX_RANKS:
            raise ValueError(f"the custom all-reduce serves 2 to {MAX_RANKS} ranks, not {world}")
        if device.index is None:        # route() compares devices: "cuda" would never equal a tensor's "cuda:0"
            device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world, self.device = rank, world, device
        self.capacity, self.one_shot_max = capacity, one_shot_max
        ops = torch.ops.stepvox
        with torch.cuda.device(device):
            self._handle = ops.car_init(rank, world, capacity)
            store.set(f"car/{rank}", bytes(ops.car_ipc_handle(self._handle).tolist()))
            peers = [list(store.get(f"car/{r}")) for r in range(world)]
            ops.car_open_peers(self._handle, torch.tensor(peers, dtype=torch.uint8))
            if shared_device:
                sms = torch.cuda.get_device_properties(device).multi_processor_count
                ops.car_set_max_blocks(self._handle, max(1, min(MAX_BLOCKS, sms // world)))

    def route(self, tensor: torch.Tensor) -> str:
        if tensor.device != self.device:
            return "nccl"
        return route(tensor, self.capacity, self.one_shot_max)

    def try_all_reduce_(self, x: torch.Tensor) -> bool:
        """Sum x over the ranks in place (the input is copied into the buffer before the kernel writes
        the sum back) and True; False, x untouched, when x routes to NCCL. Every rank routes a
        collective alike: the route depends on its size, dtype and layout only."""
        way = self.route(x)
        if way == "nccl":
            return False
        torch.ops.stepvox.car_all_reduce(self._handle, x, x, way == "two_shot")
        return True

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> torch.Tensor:
        """residual += the sum of x [rows, hidden] over the ranks (in place); returns
        RMSNorm(residual) * weight: the next layer's normalized input, in one kernel."""
        out = torch.empty_like(x)
        torch.ops.stepvox.car_all_reduce_add_rms_norm(self._handle, x, residual, weight, eps, out)
        return out

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", 0), 0
        if handle:
            torch.ops.stepvox.car_dispose(handle)
