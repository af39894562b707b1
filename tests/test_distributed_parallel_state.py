"""RankGroup: an engine's own process group (store + gloo backend, no torch.distributed default
group). Ranks run as threads of this process here, which is itself what the old process-wide
group could not do: two groups at once, each with its own store, and nothing left after close."""
import os
import threading

import pytest
import torch

from stepvox.engine.distributed.parallel_state import RankGroup, TPGroup, connect_store, serve_store
from stepvox.engine.errors import EngineDeadError

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
