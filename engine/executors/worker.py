"""A tensor-parallel worker process: one rank, one device, one shard of the model.

It says it has started ("joined") over its pipe to the driver, joins the engine's process group,
builds its ModelRunner (reading only its slices of the checkpoint), reports readiness, then runs
every step plan the driver sends down the pipe until told to stop (with the token ids of a plan
made ahead, which follow in a broadcast on the model's group). Any failure is reported to the
driver (rank and traceback) before the process exits; the process exits as soon as the driver's
does, and leaves Ctrl-C to the driver.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait

import torch

from ..config import Step1Config
from ..distributed.parallel_state import RankGroup, TPGroup, connect_store
from ..model_runner import ModelRunner

PARENT_GONE_EXIT = 70


def exit_with_parent() -> None:
    """Exit as soon as the driver process is gone, whatever this rank is blocked in. (Not
    PR_SET_PDEATHSIG: that fires when the *thread* that started us ends, which kills the workers
    of an engine created in a short-lived thread.)"""
    parent = mp.parent_process()
    if parent is None:
        return
    threading.Thread(target=_exit_when_ready, args=(parent.sentinel,), name="stepvox-tp-parent-watch",
                     daemon=True).start()


def _exit_when_ready(sentinel: int) -> None:
    wait([sentinel])
    os._exit(PARENT_GONE_EXIT)


def worker_main(rank: int, size: int, store_port: int, model_path: str, ecfg, device_str: str, conn) -> None:
    # a terminal's Ctrl-C reaches every process of the group; the driver decides how ranks stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    group = None
    try:
        device = torch.device(device_str)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = connect_store(store_port)
        conn.send(("joined", os.getpid()))      # the driver joins the group only once all ranks live
        group = RankGroup(store, rank, size, device, custom_all_reduce=ecfg.custom_all_reduce,
                          share_device=ecfg.tensor_parallel_share_device)
        cfg = Step1Config.from_folder(model_path)
        runner = ModelRunner(model_path, cfg, ecfg, device, TPGroup(rank, size, group))
        conn.send(("ready", runner.num_pages))
        while True:
            try:
                kind, payload = conn.recv()
            except EOFError:           # the driver closed its end: nobody left to report to
                os._exit(PARENT_GONE_EXIT)
            if kind == "stop":
                break
            plans, tokens_follow = payload
            input_tokens = None
            if tokens_follow:          # a step planned ahead: rank 0's samples, on the device
                input_tokens = torch.empty(sum(p.ahead for p in plans), dtype=torch.long, device=device)
                group.broadcast(input_tokens, src=0)
            runner.execute(plans, input_tokens)
    except BaseException:  # noqa: BLE001 - the driver must learn why this rank failed
        try:
            conn.send(("error", (time.monotonic(), traceback.format_exc())))
        finally:
            os._exit(1)
    finally:
        if group is not None:
            group.close()
