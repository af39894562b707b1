"""Staged step inputs (engine/step_inputs.py): values packed per dtype into host buffers used by
turns, copied once, returned as device views of the right shape and dtype."""
import numpy as np
import torch

from stepvox.engine.step_inputs import StagedInputs


def test_parts_come_back_as_views_with_their_values_and_shapes():
    staging = StagedInputs({torch.long: 16, torch.int32: 32}, torch.device("cpu"))
    first_turn = staging.turn
    table = np.arange(12, dtype=np.int32).reshape(3, 4)
    ids, lens, tab, slots = staging.put([([5, 6, 7], torch.long), ([9, 10, 11], torch.int32),
                                         (table, torch.int32), ([100, 101, 102], torch.long)])
    assert ids.dtype == torch.long and ids.tolist() == [5, 6, 7] and slots.tolist() == [100, 101, 102]
    assert lens.dtype == torch.int32 and lens.tolist() == [9, 10, 11]
    assert tab.shape == (3, 4) and torch.equal(tab, torch.from_numpy(table))
    assert ids.data_ptr() == staging.dev[torch.long].data_ptr()            # views of the device buffer
    (again,) = staging.put([([1, 2], torch.long)])
    assert staging.turn == first_turn and again.tolist() == [1, 2]          # two puts: back to the first set
    assert staging.host[torch.long][first_turn][:3].tolist() == [5, 6, 7]  # the second put used the other set


def test_steps_larger_than_the_buffers_are_copied_directly():
    staging = StagedInputs({torch.long: 4}, torch.device("cpu"))
    (big,) = staging.put([(list(range(10)), torch.long)])
    assert big.tolist() == list(range(10))
    (other,) = staging.put([([1.5], torch.float32)])                        # no buffer for this dtype
    assert other.dtype == torch.float32 and other.tolist() == [1.5]
    assert staging.turn == 0                                                # neither used the buffers
