"""RankGroup: an engine's own process group (store + gloo backend, no torch.distributed default
group). Ranks run as threads of this process here, which is itself what the old process-wide
group could not do: two groups at once, each with its own store, and nothing left after close."""
import os
import threading

import pytest
import torch

from stepvox.engine.attention_metadata import AttentionMetadata
from stepvox.engine.config import EngineConfig, Step1Config
from stepvox.engine.distributed.parallel_state import RankGroup, TPGroup, connect_store, serve_store
from stepvox.engine.errors import ConfigError, EngineDeadError
from stepvox.engine.executors.tensor_parallel import rank_devices
from stepvox.engine.models.step1 import Step1ForCausalLM
from stepvox.engine.models.step1_checkpoint import CheckpointReader
from stepvox.kernels import KernelConfig, rms_norm
from stepvox.testing.step1 import write_random_step1

CPU = torch.device("cpu")


def _resources():
    return threading.active_count(), len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _in_threads(size: int, fn) -> list:
    """fn(rank) for every rank, each in its own thread (a rendezvous or a collective blocks until
    all ranks arrive); the results in rank order."""
    results = [None] * size

    def run(rank):
        results[rank] = fn(rank)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _join(size: int) -> list[RankGroup]:
    """A group of `size` ranks, each constructed in its own thread (construction is a rendezvous)."""
    master = serve_store()
    return _in_threads(size, lambda rank: RankGroup(master if rank == 0 else connect_store(master.port),
                                                    rank, size, CPU))


def _on_all_ranks(groups, fn):
    return _in_threads(len(groups), lambda rank: fn(rank, groups[rank]))


def _collectives(rank, group):
    tp = TPGroup(rank, group.size, group)
    summed = tp.all_reduce(torch.full((3,), float(rank + 1)))
    logits = tp.gather_logits(torch.full((2, 2), float(rank)))
    smallest = tp.min_int(10 - rank, CPU)
    ids = torch.arange(4) if rank == 0 else torch.zeros(4, dtype=torch.long)
    group.broadcast(ids, src=0)
    return summed.tolist(), logits.tolist(), smallest, ids.tolist()


def test_two_groups_coexist_and_close_without_leaks():
    for _ in range(2):                     # the first round starts gloo's lazily made pieces
        for g in _join(2):
            g.close()
    baseline = _resources()
    for _ in range(3):
        a, b = _join(2), _join(3)          # two engines' groups in one process, different sizes
        ra, rb = _on_all_ranks(a, _collectives), _on_all_ranks(b, _collectives)
        assert ra[1] == ([3.0] * 3, [[0.0, 0.0, 1.0, 1.0]] * 2, 9, [0, 1, 2, 3])
        assert rb[2] == ([6.0] * 3, [[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]] * 2, 8, [0, 1, 2, 3])
        for g in a + b:
            g.close()
    assert _resources() == baseline


def test_closed_group_raises_a_typed_error():
    groups = _join(2)
    for g in groups:
        g.close()
    with pytest.raises(EngineDeadError, match="closed"):
        TPGroup(0, 2, groups[0]).all_reduce(torch.ones(2))
    groups[0].close()                      # closing twice is harmless


class _HostFusedGroup(RankGroup):
    """The fused all-reduce + residual add + RMSNorm in two steps over gloo. It stands in for the
    custom kernel (CUDA only) so that the layers' wiring can be checked on the CPU: which products
    leave their partial sums, where the residual and the norms meet them (first layer, last norm)."""
    calls = 0

    def fuses_add_rms_norm(self, x):
        return True

    def all_reduce_add_rms_norm(self, x, residual, weight, eps):
        type(self).calls += 1
        self.all_reduce(x)
        return rms_norm(x, weight, eps, residual, backend="reference")[0]


def test_the_layers_leave_row_parallel_sums_to_the_fused_norm(tmp_path):
    folder = write_random_step1(str(tmp_path / "m"), seed=3, hidden_size=64, num_attention_heads=4,
                                num_attention_groups=2, num_hidden_layers=3)
    cfg = Step1Config.from_folder(folder)
    ids = torch.tensor([5, 300, 7, 65600, 12, 9, 1000], dtype=torch.long)
    meta = AttentionMetadata(slot_mapping=None, num_prefill_tokens=len(ids),
                             prefill_cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32),
                             prefill_max_len=len(ids))

    def hidden(tp):
        model = Step1ForCausalLM(cfg, torch.float32, CPU, tp, KernelConfig("reference"))
        with CheckpointReader(folder, cfg) as reader:
            model.load_weights(reader)
        return model(ids, meta)

    single = hidden(TPGroup())
    for kind in (RankGroup, _HostFusedGroup):
        master = serve_store()
        groups = _in_threads(2, lambda rank: kind(master if rank == 0 else connect_store(master.port), rank, 2, CPU))
        try:
            outs = _in_threads(2, lambda rank: hidden(TPGroup(rank, 2, groups[rank])))
        finally:
            for g in groups:
                g.close()
        for out in outs:
            torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-5)
    # per rank: every layer's post-attention norm, the input norms of all layers but the first (the
    # embedding's output is whole) and the final norm
    assert _HostFusedGroup.calls == 2 * (2 * cfg.num_hidden_layers)


def test_ranks_sharing_a_gpu_get_the_one_device_and_the_option_is_checked():
    assert rank_devices(torch.device("cuda", 1), 4, share=True) == ["cuda:1"] * 4
    assert rank_devices(CPU, 2, share=True) == ["cpu", "cpu"]
    EngineConfig(tensor_parallel_share_device=True).validate()
    with pytest.raises(ConfigError, match="tensor_parallel_share_device"):
        EngineConfig(tensor_parallel_share_device="yes").validate()
