"""The custom all-reduce (csrc/ + engine/distributed/custom_all_reduce.py). On the CPU: which
all-reduce a tensor takes, the extension's absence reported (NCCL then), the flag reaching the
tensor-parallel ranks, and, where nvcc and cmake exist, that the extension builds with CMake and its
ops register. On a GPU (marked): ranks sharing the card sum like float64, eager and in a CUDA graph,
one-shot, two-shot and the fused add + RMSNorm."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from stepvox import LLM
from stepvox.engine.distributed import custom_all_reduce as car
from stepvox.engine.distributed.parallel_state import connect_store, serve_store
from stepvox.engine.sampling_params import SamplingParams
from stepvox.testing.step1 import write_random_step1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_route_by_size_dtype_and_layout():
    cap, one = 1 << 20, 64 << 10
    assert car.route(torch.zeros(1024, dtype=torch.bfloat16), cap, one) == "one_shot"
    assert car.route(torch.zeros(one // 4, dtype=torch.float32), cap, one) == "one_shot"
    assert car.route(torch.zeros(one // 4 + 4, dtype=torch.float32), cap, one) == "two_shot"
    assert car.route(torch.zeros(cap // 2, dtype=torch.float16), cap, one) == "two_shot"
    assert car.route(torch.zeros(cap // 2 + 8, dtype=torch.float16), cap, one) == "nccl"          # too large
    assert car.route(torch.zeros(1024, dtype=torch.int64), cap, one) == "nccl"                    # not a float
    assert car.route(torch.zeros(7, dtype=torch.bfloat16), cap, one) == "nccl"                    # 14 bytes
    assert car.route(torch.zeros(0, dtype=torch.bfloat16), cap, one) == "nccl"
    assert car.route(torch.zeros(64, 64, dtype=torch.float32).t(), cap, one) == "nccl"            # not contiguous


def test_the_extension_loads_or_says_why_not():
    car.load.cache_clear()
    reason = car.load()
    if os.path.exists(car.extension_path()):
        assert reason is None and hasattr(torch.ops.stepvox, "car_all_reduce")
    else:
        assert "is not built" in reason and "use NCCL" in reason
    assert car.load() is reason                                     # once per process


def test_the_flag_reaches_the_ranks_and_cpu_ranks_keep_gloo(tmp_path):
    folder = write_random_step1(str(tmp_path / "m"), seed=4, hidden_size=64, num_attention_heads=4,
                                num_attention_groups=2)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = []
    for opts in (dict(tensor_parallel_size=2, custom_all_reduce=True), dict(tensor_parallel_size=1)):
        llm = LLM(folder, device="cpu", max_model_len=128, kernel_backend="reference", **opts)
        try:
            if opts["tensor_parallel_size"] == 2:
                assert llm.engine.executor._group.custom is None         # a CPU group has no CUDA buffers
            tokens.append(llm.generate(["hello world"], params)[0].outputs[0].token_ids)
        finally:
            llm.shutdown()
    assert tokens[0] == tokens[1]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cmake")), reason="needs nvcc and cmake")
def test_the_extension_builds_with_cmake_and_registers_its_ops(tmp_path):
    build, out = tmp_path / "build", tmp_path / "out"
    configure = subprocess.run(["cmake", "-S", REPO, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
                                f"-DSTEPVOX_OUTPUT_DIR={out}"], capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=1200)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    probe = ("import torch; torch.ops.load_library(%r); ops = torch.ops.stepvox\n"
             "print(all(hasattr(ops, n) for n in ('car_init', 'car_ipc_handle', 'car_open_peers', 'car_all_reduce',"
             " 'car_all_reduce_add_rms_norm', 'car_capacity', 'car_dispose')))\n"
             "try:\n    ops.car_init(0, 9, 1024)\nexcept RuntimeError as e:\n    print(str(e).splitlines()[0])\n"
             % str(out / "_C.so"))
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "True" and "stepvox._C: 2 to 8 ranks, got 9" in lines[1]


# ---------------------------------------------------------------- on a GPU
SIZES = [256, 16384, 60_000, 1 << 20, 4 << 20]   # float32 elements: 1 KB (one-shot) to 16 MB (two-shot);
# bench/custom_all_reduce.py checks up to 64 MB
CAPACITY = 16 << 20


def _rank_main(rank: int, world: int, port: int, results):
    assert car.load() is None                  # a spawned process registers the ops itself
    torch.cuda.set_device(0)
    store = connect_store(port)
    group = car.CustomAllReduce(store, rank, world, torch.device("cuda", 0), capacity=CAPACITY)
    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        for n in SIZES:
            gen = torch.Generator().manual_seed(n)
            parts = [torch.randn(n, generator=gen).to(dtype) for _ in range(world)]
            want = torch.stack([p.double() for p in parts]).sum(0)
            x = parts[rank].cuda()
            assert group.try_all_reduce_(x)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            if not torch.allclose(x.double().cpu(), want, atol=tol, rtol=tol):
                failures.append(f"{dtype} {n}")
    # captured: the graph replays the copy-in and the kernel; epochs advance on the device
    static = torch.zeros(8192, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        group.try_all_reduce_(static)
    for step in range(3):
        static.fill_(float(rank + step))
        graph.replay()
        torch.cuda.synchronize()
        if not torch.all(static == float(sum(r + step for r in range(world)))):
            failures.append(f"graph replay {step}")
    hidden = 3072
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(rank)).cuda()
    residual = torch.ones(4, hidden, device="cuda")
    weight = torch.full((hidden,), 0.5, device="cuda")
    total = sum(torch.randn(4, hidden, generator=torch.Generator().manual_seed(r)).double() for r in range(world))
    new = total + 1
    want = new / torch.sqrt((new ** 2).mean(-1, keepdim=True) + 1e-5) * 0.5
    out = group.all_reduce_add_rms_norm(x, residual, weight, 1e-5)
    if not (torch.allclose(residual.double().cpu(), new, atol=1e-4) and torch.allclose(out.double().cpu(), want,
                                                                                          atol=1e-4)):
        failures.append("fused add + rms norm")
    torch.cuda.synchronize()
    group.close()
    results[rank] = failures


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_sharing_one_gpu_sum_like_float64(world):
    if car.load() is not None:
        pytest.skip("stepvox._C is not built (cmake -S . -B build && cmake --build build)")
    store = serve_store()
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_rank_main, args=(r, world, store.port, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert dict(results) == {r: [] for r in range(world)}
