"""The one strict weight loader (engine/models/weights.py): data-only reading, named mismatches,
copies that do not reference the file's tensors."""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch

from stepvox.engine.errors import CheckpointError, MissingTensorsError, TensorShapeError, UnexpectedTensorsError
from stepvox.engine.models.weights import check_tensors, check_values, load_strict, read_torch_state_dict, tensor_shapes


class _Gadget:
    """Pickles as a call of os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    """An arbitrary class instance (no code on load, but still an object the file asks to build)."""

    def __init__(self):
        self.value = 3


def _sd():
    g = torch.Generator().manual_seed(0)
    return OrderedDict([("lin.weight", torch.randn(3, 4, generator=g)), ("lin.bias", torch.randn(3, generator=g))])


# ---------------------------------------------------------------- read_torch_state_dict
@pytest.mark.parametrize("mmap", [False, True])
def test_read_plain_and_wrapped_state_dicts(tmp_path, mmap):
    sd = _sd()
    for name, payload in [("plain", sd), ("sd", {"state_dict": sd, "epoch": 3}), ("model", {"model": sd})]:
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        got = read_torch_state_dict(path, mmap=mmap)
        assert type(got) is dict and list(got) == list(sd)
        for k in sd:
            assert torch.equal(got[k], sd[k])
    legacy = tmp_path / "legacy.pt"                     # the pre-zip format reads whole even with mmap
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    got = read_torch_state_dict(str(legacy), mmap=mmap)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_refuses_pickles_that_build_objects_and_names_the_global(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "gadget.pt"
    torch.save({"w": torch.zeros(2), "x": _Gadget(marker)}, path)
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match=rf"gadget.pt: refused: the file asks to build "
                                                  rf"`{os.system.__module__}.system`") as info:
            read_torch_state_dict(path, mmap=mmap)
        assert "weights_only=True" in str(info.value) and "runs no code" in str(info.value)
        assert not marker.exists()                      # nothing was executed
    path = tmp_path / "custom.pt"
    torch.save({"w": torch.zeros(2), "obj": _Custom()}, path)
    with pytest.raises(CheckpointError, match=rf"refused: the file asks to build `{__name__}._Custom`"):
        read_torch_state_dict(path)


# Opcode-level payloads the safe unpickler stops at before naming a global (torch's message for them
# is its advice plus "Unsupported operand N" / "Can only build ...").
_RAW_PAYLOADS = {
    "inst.pt": b"(S'touch MARKER'\nios\nsystem\n.",                           # protocol 0 INST os.system
    "ext.pt": b"\x80\x02\x82\x01.",                                            # EXT1 (copyreg registry)
    "build.pt": b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00ab.",  # BUILD with a dict state
}


def test_refusals_name_the_global_and_never_advise_weights_only_false(tmp_path):
    """Issue 14, item 8: torch's message says weights_only=False "will likely succeed" (by running
    the file); ours names the blocked global and says nothing of the kind. Whatever the format
    (torch zip, legacy torch, a bare pickle), the os.system the file asks for never runs."""
    marker = tmp_path / "ran"
    gadget = {"w": torch.zeros(2), "x": _Gadget(marker)}
    torch.save(gadget, tmp_path / "zip.pt")
    torch.save(gadget, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "bare.pt").write_bytes(pickle.dumps({"x": _Gadget(marker)}, protocol=2))
    for name in ("zip.pt", "legacy.pt", "bare.pt"):
        for mmap in (False, True):
            with pytest.raises(CheckpointError) as info:
                read_torch_state_dict(tmp_path / name, mmap=mmap)
            text = str(info.value)
            assert f"{name}: refused: the file asks to build `{os.system.__module__}.system`" in text
            assert "likely succeed" not in text and "weights_only=False" not in text and "\n" not in text
            assert info.value.__cause__ is None and info.value.__suppress_context__   # no torch text chained
    for name, payload in _RAW_PAYLOADS.items():
        (tmp_path / name).write_bytes(payload.replace(b"MARKER", str(marker).encode()))
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable tensor state dict \(UnpicklingError: "
                                                  r"(Unsupported operand \d+|Can only build .*)\)$") as info:
            read_torch_state_dict(tmp_path / name)
        assert "likely succeed" not in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists()                          # nothing was executed


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: not found"):
        read_torch_state_dict(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_torch_state_dict(tmp_path)                 # a folder is not a file
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable tensor state dict"):
        read_torch_state_dict(tmp_path / "junk.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict, found list"):
        read_torch_state_dict(tmp_path / "list.pt")


# ---------------------------------------------------------------- check_tensors / tensor_shapes / check_values
def test_check_tensors_names_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (5, 5), "d": (1,)}
    check_tensors(dict(expected), expected, "m.pt")                 # all present and right: no error
    with pytest.raises(MissingTensorsError, match=r"^m.pt: 2 tensors the model needs are missing: a, d$"):
        check_tensors({"b": (4,), "c": (5, 5)}, expected, "m.pt")
    with pytest.raises(UnexpectedTensorsError, match=r"^m.pt: 2 tensors the model does not have: x, y$"):
        check_tensors({**expected, "y": (1,), "x": (2,)}, expected, "m.pt")
    with pytest.raises(TensorShapeError, match=r"^m.pt: 2 tensors have the wrong shape: a: file \[3, 2\], model "
                                               r"\[2, 3\] \(rows x cols\); c: file \[5\], model \[5, 5\]$"):
        check_tensors({**expected, "a": (3, 2), "c": (5,)}, expected, "m.pt", hints={"a": "rows x cols"})
    # several kinds at once: the message lists all of them; the class is the first kind found
    everything = {"b": (9,), "c": (5, 5), "d": (1,), "z": (1,)}
    with pytest.raises(MissingTensorsError) as info:
        check_tensors(everything, expected, "m.pt")
    assert str(info.value) == ("m.pt: 1 tensors the model needs are missing: a | 1 tensors the model does not "
                               "have: z | 1 tensors have the wrong shape: b: file [9], model [4]")
    with pytest.raises(UnexpectedTensorsError, match=r"does not have: z \| 1 tensors have the wrong shape: b"):
        check_tensors({**everything, "a": (2, 3)}, expected, "m.pt")
    for cls in (MissingTensorsError, UnexpectedTensorsError, TensorShapeError):
        assert issubclass(cls, CheckpointError) and issubclass(cls, ValueError)


def test_long_listings_are_counted():
    expected = {f"t{i:02d}": (1,) for i in range(20)}
    with pytest.raises(MissingTensorsError, match=r"20 tensors the model needs are missing: t00, t01, .*t07 "
                                                  r"\.\.\. \(\+12 more\)$"):
        check_tensors({}, expected, "big.pt")


def test_tensor_shapes_and_values():
    assert tensor_shapes({"a": torch.zeros(2, 3), "b": torch.zeros(())}, "s") == {"a": (2, 3), "b": ()}
    with pytest.raises(CheckpointError, match="s: entries that are not tensors: meta"):
        tensor_shapes({"a": torch.zeros(1), "meta": [1, 2]}, "s")
    with pytest.raises(CheckpointError, match="not tensors: 3"):
        tensor_shapes({3: torch.zeros(1)}, "s")
    check_values({"a": torch.zeros(2), "b": torch.ones(3, dtype=torch.bfloat16)}, "s")
    with pytest.raises(CheckpointError, match="s: non-floating tensors: steps"):
        check_values({"a": torch.zeros(2), "steps": torch.zeros(2, dtype=torch.long)}, "s")
    with pytest.raises(CheckpointError, match="s: tensors with NaN/inf values: b, c"):
        check_values({"a": torch.zeros(2), "c": torch.tensor([float("inf")]), "b": torch.tensor([float("nan")])}, "s")


# ---------------------------------------------------------------- load_strict
def _model():
    return torch.nn.Sequential(OrderedDict([("lin", torch.nn.Linear(4, 3))]))


@pytest.mark.parametrize("on_meta", [False, True])
def test_load_strict_copies(tmp_path, on_meta):
    torch.save(_sd(), tmp_path / "w.pt")
    tensors = read_torch_state_dict(tmp_path / "w.pt", mmap=True)
    if on_meta:
        with torch.device("meta"):
            module = _model()
    else:
        module = _model()
    assert load_strict(module, tensors, "w.pt") is module
    for name, param in module.state_dict().items():
        assert param.device.type == "cpu" and torch.equal(param, tensors[name])
        assert param.untyped_storage().data_ptr() != tensors[name].untyped_storage().data_ptr()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for t in tensors.values():                      # the file's tensors change: the module does not
        t.add_(1.0)
    for name, param in module.state_dict().items():
        assert torch.equal(param, before[name])


def test_load_strict_checks_before_copying():
    module = _model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    good = {k: torch.full_like(v, 7.0) for k, v in module.state_dict().items()}
    cases = [({"lin.weight": good["lin.weight"]}, MissingTensorsError, "missing: lin.bias"),
             ({**good, "lin.scale": torch.ones(3)}, UnexpectedTensorsError, "does not have: lin.scale"),
             ({**good, "lin.weight": torch.zeros(4, 3)}, TensorShapeError,
              r"lin.weight: file \[4, 3\], model \[3, 4\] \(transposed\?\)"),
             ({**good, "lin.bias": [0.0, 0.0, 0.0]}, CheckpointError, "not tensors: lin.bias")]
    for tensors, err, msg in cases:
        with pytest.raises(err, match=msg):
            load_strict(module, tensors, "x.pt", hints={"lin.weight": "transposed?"})
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k])        # nothing was copied in
