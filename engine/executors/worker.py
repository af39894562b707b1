"""A tensor-parallel worker process: one rank, one device, one shard of the model.

It joins the process groups, builds its ModelRunner (reading only its slices of the checkpoint),
reports readiness to the driver, then runs every step plan the driver broadcasts until told to
stop (with the token ids that follow a plan made ahead). Any failure is reported to the driver
(rank and traceback) before the process exits.
"""
from __future__ import annotations

import ctypes
import os
import signal
import traceback

import torch
import torch.distributed as dist

from ..config import Step1Config
from ..distributed.parallel_state import init_groups
from ..model_runner import ModelRunner


def die_with_parent() -> None:
    """Linux: get SIGKILL when the driver dies, so no worker outlives it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except OSError:
        pass


def receive_plan(control):
    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def worker_main(rank: int, size: int, init_method: str, model_path: str, ecfg, device_str: str, conn) -> None:
    die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        device = torch.device(device_str)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tp, control = init_groups(rank, size, init_method, device)
        cfg = Step1Config.from_folder(model_path)
        runner = ModelRunner(model_path, cfg, ecfg, device, tp)
        conn.send(("ready", runner.num_pages))
        while True:
            kind, payload = receive_plan(control)
            if kind == "stop":
                break
            plans, tokens_follow = payload
            input_tokens = None
            if tokens_follow:          # a step planned ahead: rank 0's samples, on the device
                input_tokens = torch.empty(len(plans), dtype=torch.long, device=device)
                dist.broadcast(input_tokens, src=0)
            runner.execute(plans, input_tokens)
        conn.send(("stopped", None))
    except BaseException:  # noqa: BLE001 - the driver must learn why this rank failed
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
