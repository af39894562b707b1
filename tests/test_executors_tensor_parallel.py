"""Tensor parallelism on CPU processes (gloo): outputs equal TP=1, a dead worker is reported by
rank without hanging, and each rank reads only its slices of the checkpoint."""
import os
import signal

import pytest
import torch

from stepvox import LLM, SamplingParams
from stepvox.engine.config import Step1Config
from stepvox.engine.distributed.parallel_state import TPGroup
from stepvox.engine.errors import ConfigError, WorkerFailedError
from stepvox.engine.models.step1 import Step1ForCausalLM
from stepvox.engine.models.step1_checkpoint import CheckpointReader
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


def _tokens(folder, tp, **opts):
    llm = _llm(folder, tp, **opts)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("fixture,tp", [("two_groups", 2), ("four_groups", 2), ("four_groups", 4)])
def test_tp_greedy_equals_tp1(fixture, tp, request):
    folder = request.getfixturevalue(fixture)
    assert _tokens(folder, tp) == _tokens(folder, 1)


def test_tp1_through_worker_path_equals_in_process(two_groups):
    assert _tokens(two_groups, 1, distributed_executor="mp") == _tokens(two_groups, 1)


def test_killed_worker_is_reported_by_rank(two_groups):
    llm = _llm(two_groups, 2)
    engine = llm.engine
    worker = engine.executor.workers[0]
    engine.add_request("Hello world", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    with pytest.raises(WorkerFailedError, match=r"rank 1 .*signal 9"):
        for _ in range(5):
            engine.step()
    llm.shutdown()
    assert not worker.is_alive()
    assert all(not p.is_alive() for p in engine.executor.workers)


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
