"""Staged step inputs (engine/device/staging.py): values packed per dtype into host buffers used by
turns, copied once, returned as device views of the right shape and dtype, or copied into given
device tensors of any strides."""
import numpy as np
import torch

from stepvox.engine.device.staging import StagedInputs


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


def test_put_into_fills_given_non_contiguous_tensors():
    staging = StagedInputs({torch.long: 32, torch.int32: 32}, torch.device("cpu"))
    io = torch.full((3, 8), -7, dtype=torch.long)                # a graph's static inputs: [3, B] ...
    tables = torch.full((6, 10), -9, dtype=torch.int32)          # ... and [B, max_pages]
    cols = torch.full((5, 4), -5, dtype=torch.int32)
    io_values = np.arange(15, dtype=np.int64).reshape(3, 5) + 100
    table_values = np.arange(12, dtype=np.int32).reshape(4, 3) + 1
    col_values = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=np.int32)
    dst_io, dst_tables, dst_cols = io[:, :5], tables[:4, :3], cols.t()[1:3]      # row-strided, transposed
    assert not (dst_io.is_contiguous() or dst_tables.is_contiguous() or dst_cols.is_contiguous())
    staging.put_into([(io_values, dst_io), (table_values, dst_tables), (col_values, dst_cols)])
    assert torch.equal(dst_io, torch.from_numpy(io_values))
    assert torch.equal(dst_tables, torch.from_numpy(table_values))
    assert torch.equal(cols.t()[1:3], torch.from_numpy(col_values))
    # nothing outside the given views is touched
    assert (io[:, 5:] == -7).all() and (tables[4:] == -9).all() and (tables[:, 3:] == -9).all()
    assert (cols[:, 0] == -5).all() and (cols[:, 3] == -5).all()
    # the copies went through this turn's host buffers, and the next staging uses the other set
    assert staging.turn == 1
    assert staging.host[torch.long][0][:15].tolist() == io_values.reshape(-1).tolist()
    assert staging.host[torch.int32][0][:12].tolist() == table_values.reshape(-1).tolist()
    staging.put_into([(np.zeros((3, 5), dtype=np.int64), io[:, 3:])])
    assert staging.turn == 0
    assert torch.equal(io[:, :3], torch.from_numpy(io_values[:, :3]))     # the earlier values stay put
    assert (io[:, 3:] == 0).all()
    assert staging.host[torch.long][0][:15].tolist() == io_values.reshape(-1).tolist()   # other set used


def test_put_into_a_step_larger_than_the_buffers_arrives_intact():
    staging = StagedInputs({torch.long: 4, torch.int32: 4}, torch.device("cpu"))
    io = torch.zeros(3, 16, dtype=torch.long)
    tables = torch.zeros(8, 6, dtype=torch.int32)
    io_values = np.arange(30, dtype=np.int64).reshape(3, 10) * 3 + 1     # 30 > 4 elements of room
    table_values = np.arange(15, dtype=np.int32).reshape(5, 3) - 4       # 15 > 4
    dst_io, dst_tables = io[:, 2:12], tables[1:6, ::2]                      # row- and column-strided
    assert not (dst_io.is_contiguous() or dst_tables.is_contiguous())
    staging.put_into([(io_values, dst_io), (table_values, dst_tables)])
    assert torch.equal(io[:, 2:12], torch.from_numpy(io_values))
    assert (io[:, :2] == 0).all() and (io[:, 12:] == 0).all()
    assert torch.equal(tables[1:6, ::2], torch.from_numpy(table_values))
    assert (tables[0] == 0).all() and (tables[6:] == 0).all() and (tables[:, 1::2] == 0).all()
    assert staging.turn == 0                                                # the buffers were not used
    # one part too large sends the whole step directly, the small part included
    small = torch.zeros(2, dtype=torch.long)
    staging.put_into([([8, 9], small), (np.ones((5, 3), dtype=np.int32), tables[1:6, ::2])])
    assert small.tolist() == [8, 9] and (tables[1:6, ::2] == 1).all()
    assert staging.turn == 0
    # a dtype without a buffer goes directly too
    scales = torch.zeros(4, 2, dtype=torch.float32)
    staging.put_into([(np.array([0.5, -1.25]), scales[:, 1][1:3])])
    assert scales[1:3, 1].tolist() == [0.5, -1.25] and (scales[:, 0] == 0).all()
