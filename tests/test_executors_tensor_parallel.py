"""Tensor parallelism on CPU processes (gloo): outputs equal TP=1, a dead worker is reported by
rank without hanging, and each rank reads only its slices of the checkpoint. The process group is
the engine's own: engines of different sizes coexist in one process and leave nothing behind; a
script without a `__main__` guard, a signal to the driver and a killed worker end in seconds."""
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from stepvox import LLM, SamplingParams
from stepvox.engine.config import Step1Config
from stepvox.engine.distributed.parallel_state import TPGroup
from stepvox.engine.errors import ConfigError, WorkerFailedError
from stepvox.engine.models.step1 import Step1ForCausalLM
from stepvox.engine.models.step1_checkpoint import CheckpointReader
from stepvox.engine.models.step1_quantize import quantize_folder
from stepvox.testing.step1 import write_random_step1

PROMPTS = ["Hello world", [1, 5, 300, 65600, 70000, 12, 13]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def four_groups(tmp_path_factory):
    return write_random_step1(str(tmp_path_factory.mktemp("tp-4kv")), seed=3, hidden_size=64, num_attention_heads=8,
                              num_attention_groups=4, intermediate_size=128)


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory):
    return write_random_step1(str(tmp_path_factory.mktemp("tp-2kv")), seed=4, hidden_size=64, num_attention_heads=4,
                              num_attention_groups=2, intermediate_size=96)


def _llm(folder, tp, **opts):
    # the workers get the kernel backend with the EngineConfig
    return LLM(folder, device="cpu", max_model_len=256, tensor_parallel_size=tp, kernel_backend="reference", **opts)


def _generate(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _tokens(folder, tp, **opts):
    llm = _llm(folder, tp, **opts)
    try:
        return _generate(llm)
    finally:
        llm.shutdown()


def _resources():
    """Python threads, file descriptors and OS threads of this process."""
    return threading.active_count(), len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (one reparented to init may wait to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("fixture,tp", [("two_groups", 2), ("four_groups", 2), ("four_groups", 4)])
def test_tp_greedy_equals_tp1(fixture, tp, request):
    folder = request.getfixturevalue(fixture)
    assert _tokens(folder, tp) == _tokens(folder, 1)


@pytest.mark.parametrize("tp", [2, 4])
def test_fp8_tp_greedy_equals_fp8_tp1(four_groups, tp, tmp_path):
    """FP8 weights quantized while loading, and an FP8 folder: every rank slices weights and scales
    like bf16 ones (whole-row scales on row-parallel ranks), so TP gives TP 1's tokens."""
    fp8 = quantize_folder(four_groups, str(tmp_path / "fp8"), lm_head=True)
    reference = _tokens(four_groups, 1, quantization="fp8", quantize_lm_head=True)
    assert _tokens(four_groups, tp, quantization="fp8", quantize_lm_head=True) == reference
    assert _tokens(fp8, tp) == reference


@pytest.mark.parametrize("tp", [2, 4])
def test_fp8_kv_cache_tp_greedy_equals_tp1(four_groups, tp):
    """Each rank calibrates the FP8 scales of its own KV heads on the same calibration prefill."""
    assert _tokens(four_groups, tp, kv_cache_dtype="fp8") == _tokens(four_groups, 1, kv_cache_dtype="fp8")


def test_dummy_weights_tp2_equal_tp1(four_groups):
    """Each rank makes the same whole random tensor and keeps its slice."""
    assert _tokens(four_groups, 2, load_format="dummy") == _tokens(four_groups, 1, load_format="dummy")


def test_tp1_through_worker_path_equals_in_process(two_groups):
    assert _tokens(two_groups, 1, distributed_executor="mp") == _tokens(two_groups, 1)


def test_killed_worker_is_reported_by_rank(two_groups):
    llm = _llm(two_groups, 2)
    engine = llm.engine
    worker = engine.executor.workers[0]
    pid = worker.pid
    engine.add_request("Hello world", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=10)
    with pytest.raises(WorkerFailedError, match=r"rank 1 .*signal 9"):
        for _ in range(5):
            engine.step()
    with pytest.raises(WorkerFailedError, match=r"rank 1 .*signal 9"):     # and so on, not a hang
        engine.step()
    llm.shutdown()
    assert not _running(pid)
    assert engine.executor.workers == []


def test_tp_must_divide_kv_groups(two_groups):
    with pytest.raises(ConfigError, match="must divide"):
        _llm(two_groups, 4)


class RecordingReader(CheckpointReader):
    """Records the index expression of every slice a rank reads."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reads = {}

    def get(self, name):
        inner = super().get(name)
        reads = self.reads

        class Slice:
            def __getitem__(self, index):
                reads[name] = index
                return inner[index]

            def get_dtype(self):
                return inner.get_dtype()
        return Slice()


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_reads_only_its_slices(four_groups, rank, reference_kernels):
    cfg = Step1Config.from_folder(four_groups)
    model = Step1ForCausalLM(cfg, torch.float32, torch.device("cpu"), tp=TPGroup(rank=rank, size=2),
                             kernels=reference_kernels)
    with RecordingReader(four_groups, cfg) as reader:
        model.load_weights(reader)
        full = {n: reader._file(reader.locations[n]).get_tensor(n) for n in reader.locations}
    h, kv, inter, vocab = cfg.hidden_size, cfg.kv_dim, cfg.intermediate_size, cfg.vocab_size
    rows = {"q_proj": h, "k_proj": kv, "v_proj": kv, "gate_proj": inter, "up_proj": inter}
    for name, index in reader.reads.items():
        short = name.split(".")[-2]
        if short in rows:
            part = rows[short] // 2
            assert index == slice(rank * part, (rank + 1) * part), name
        elif short in ("o_proj", "down_proj"):
            part = (h if short == "o_proj" else inter) // 2
            assert index == (slice(None), slice(rank * part, (rank + 1) * part)), name
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert index == slice(rank * vocab // 2, (rank + 1) * vocab // 2), name
        else:
            assert name.endswith("norm.weight") and index == slice(None), name   # replicated norms
    assert len(reader.reads) == len(full)
    attn = model.layers[1].self_attn
    q_rows = full["model.layers.1.self_attn.q_proj.weight"][rank * h // 2:(rank + 1) * h // 2]
    assert torch.equal(attn.qkv_proj.weight[:h // 2], q_rows.float())
    down_cols = full["model.layers.0.mlp.down_proj.weight"][:, rank * inter // 2:(rank + 1) * inter // 2]
    assert torch.equal(model.layers[0].mlp.down_proj.weight, down_cols.float())


def test_tp_async_scheduling_gives_the_same_tokens(two_groups):
    """Steps planned ahead reach the workers with their token ids in a broadcast behind the plan:
    greedy and seeded sampled outputs equal stepping one step at a time."""
    prompts = PROMPTS + ["a third prompt"]
    params = [GREEDY, SamplingParams(temperature=0.8, top_k=20, seed=11, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    outs = {}
    for async_on in (True, False):
        llm = _llm(two_groups, 2, async_scheduling=async_on)
        try:
            outs[async_on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            ahead = llm.engine.stats["steps_ahead"]
        finally:
            llm.shutdown()
        assert (ahead > 0) == async_on
    assert outs[True] == outs[False]
    assert [len(t) for t in outs[True]] == [10, 10, 4]


# ---------------------------------------------------------------- the group is the engine's own
def test_tp1_and_tp2_engines_coexist_and_release_everything(tiny_model):
    """Was torch.distributed's process-wide default group: each TP=2 create/destroy left 6 OS threads
    and 16 file descriptors behind (and a TP=1 engine beside a TP=2 one was reported to hang)."""
    alone = {tp: _tokens(tiny_model, tp) for tp in (1, 2)}   # also starts what a first run starts once
    assert alone[1] == alone[2]
    baseline = _resources()
    for order in ((1, 2), (2, 1), (2, 1)):
        llms = [_llm(tiny_model, tp) for tp in order]
        try:
            for llm, tp in zip(llms, order):
                assert _generate(llm) == alone[tp]
        finally:
            for llm in llms:
                llm.shutdown()
        assert _resources() == baseline


def test_two_tp2_engines_coexist(two_groups):
    """Was a ValueError: the default process group initialised twice."""
    expected = _tokens(two_groups, 1)
    a = _llm(two_groups, 2)
    try:
        b = _llm(two_groups, 2)
        try:
            assert _generate(a) == _generate(b) == _generate(a) == expected
        finally:
            b.shutdown()
        assert _generate(a) == expected            # one engine's shutdown leaves the other serving
    finally:
        a.shutdown()


def test_engine_made_in_a_thread_that_ends_keeps_its_workers(two_groups):
    """Workers exit with the driver process, not with the thread that started them (the Linux
    parent-death signal follows the thread)."""
    made = []
    maker = threading.Thread(target=lambda: made.append(_llm(two_groups, 2)))
    maker.start()
    maker.join()
    llm = made[0]
    try:
        time.sleep(0.5)
        assert _generate(llm) == _tokens(two_groups, 1)
    finally:
        llm.shutdown()


# ---------------------------------------------------------------- failures end in seconds, typed
def _kill_worker_while_generating(llm, worker: int, delay: float) -> int:
    """SIGKILL worker `worker` (rank worker + 1) `delay` s into repeated generate calls; the call
    must fail with a WorkerFailedError naming that rank and pid. Shuts the LLM down; returns the pid."""
    pid = llm.engine.executor.workers[worker].pid
    killer = threading.Timer(delay, os.kill, (pid, signal.SIGKILL))
    try:
        with pytest.raises(WorkerFailedError, match=rf"rank {worker + 1} \(pid {pid}\) died: killed by signal 9"):
            killer.start()
            for _ in range(100):
                llm.generate(PROMPTS, SamplingParams(max_tokens=30, ignore_eos=True))
    finally:
        killer.cancel()
        llm.shutdown()
    return pid


@pytest.mark.parametrize("delay", [0.0, 0.4, 1.0])
def test_worker_killed_mid_run_is_a_worker_failed_error(two_groups, delay):
    """Was sometimes gloo's raw RuntimeError: the collective failed before the death was visible."""
    baseline = _resources()
    pid = _kill_worker_while_generating(_llm(two_groups, 2), worker=0, delay=delay)
    assert not _running(pid)
    assert _resources()[1:] == baseline[1:]      # fds and OS threads (the timer thread may linger)


def test_killed_worker_is_named_among_four(four_groups):
    """The others' collectives fail after it; the report names the rank that was killed."""
    _kill_worker_while_generating(_llm(four_groups, 4), worker=1, delay=0.5)


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_script_without_main_guard_fails_in_seconds_naming_the_fix(two_groups, tmp_path):
    """Was a 600 s hang, then "rank 1 died: exit code 1": the spawned worker re-imports the script,
    which starts another engine."""
    script = _script(tmp_path, """
        import sys
        from stepvox import LLM
        llm = LLM(sys.argv[1], device="cpu", max_model_len=256, tensor_parallel_size=2, kernel_backend="reference")
        print("unreachable")
    """)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, script, two_groups], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert done.returncode != 0 and "unreachable" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("stepvox.engine.errors.WorkerFailedError: tensor-parallel rank 1"), done.stderr
    assert 'under `if __name__ == "__main__":`' in done.stderr and script in done.stderr
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGINT, signal.SIGTERM], ids=["INT", "INT-again", "TERM"])
def test_signal_to_the_driver_stops_every_rank_in_seconds(two_groups, tmp_path, sig):
    """Was a hang in shutdown's collective after SIGINT (2 of 3 runs)."""
    script = _script(tmp_path, """
        import json, signal, sys
        from stepvox import LLM, SamplingParams

        if __name__ == "__main__":
            signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, even if inherited ignored
            llm = LLM(sys.argv[1], device="cpu", max_model_len=256, tensor_parallel_size=2, kernel_backend="reference")
            print(json.dumps([p.pid for p in llm.engine.executor.workers]), flush=True)
            while True:
                llm.generate(["Hello world"] * 4, SamplingParams(max_tokens=200, ignore_eos=True))
    """)
    driver = subprocess.Popen([sys.executable, script, two_groups], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    workers = []
    try:
        assert select.select([driver.stdout], [], [], 120)[0], "the driver did not start"
        workers = json.loads(driver.stdout.readline())
        time.sleep(0.5)                          # into the generation loop, likely mid-step
        t0 = time.monotonic()
        driver.send_signal(sig)
        driver.wait(timeout=10)
        deadline = t0 + 10
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(pid) for pid in workers), workers
    finally:
        for pid in [driver.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        driver.wait()
