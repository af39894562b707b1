"""Reading weight files safely and checking them strictly: the one loader of every model.

Nothing from a model folder is executed: torch files are read with `torch.load(weights_only=True)`
(plain tensors and containers only), safetensors and ONNX initializers as data. Before anything is
copied, the tensors a file holds are compared with the tensors the model needs: every missing,
unexpected and mis-shaped tensor is named, with the model's and the file's shapes.
"""
from __future__ import annotations

import os
import re

import torch

from ..errors import CheckpointError, MissingTensorsError, TensorShapeError, UnexpectedTensorsError

_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REFUSAL = "Weights only load failed"      # how torch's weights_only unpickler starts a refusal


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _load_error(path: str, exc: Exception) -> CheckpointError:
    """Our account of a failed torch.load: a refused global is named; otherwise the cause, without
    torch's advice to retry with weights_only=False (which "will likely succeed" by running the file)."""
    text = str(exc)
    blocked = _BLOCKED_GLOBAL.search(text)
    if blocked:
        return CheckpointError(f"{path}: refused: the file asks to build `{blocked.group(1)}`, which a plain "
                               "tensor state dict never needs; stepvox reads weights as data only "
                               "(torch.load weights_only=True) and runs no code from a model folder")
    if text.startswith(_REFUSAL):
        # torch's text: its advice, then the cause in a paragraph of its own, then a link
        causes = [p.strip() for p in text.split("\n\n")[1:]
                  if p.strip() and not p.startswith("Check the documentation")]
        text = causes[0] if causes else "the safe unpickler stopped"
    first = text.splitlines()[0] if text else ""
    return CheckpointError(f"{path}: not a readable tensor state dict ({type(exc).__name__}: {first})")


def read_torch_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict:
    """The tensors of a torch checkpoint file (a state dict, or one under "state_dict" / "model"),
    read with weights_only=True; `mmap` maps the file instead of reading it whole (for files of
    which only a part is used; legacy non-zip files are read whole). CheckpointError when the file
    is missing, unreadable, or holds anything but plain data (a pickle that would build objects is
    refused, naming what it wanted)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - unpickling refusals and IO errors have many types
        raise _load_error(path, exc) from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(data).__name__}")
    return dict(data)


def check_tensors(found: dict[str, tuple], expected: dict[str, tuple], source: str,
                  hints: dict[str, str] | None = None) -> None:
    """Compare the shapes a file holds (`found`, name -> shape) with the ones the model needs.
    Raises MissingTensorsError, else UnexpectedTensorsError, else TensorShapeError; the message lists
    every problem of each kind (with `hints` on what a mis-shaped tensor's size comes from)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    if not (missing or extra or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors the model needs are missing: {_listing(missing)}")
    if extra:
        parts.append(f"{len(extra)} tensors the model does not have: {_listing(extra)}")
    if wrong:
        detail = "; ".join(f"{k}: file {list(found[k])}, model {list(expected[k])}"
                           + (f" ({hints[k]})" if hints and k in hints else "") for k in wrong[:6])
        parts.append(f"{len(wrong)} tensors have the wrong shape: {detail}")
    error = MissingTensorsError if missing else UnexpectedTensorsError if extra else TensorShapeError
    raise error(f"{source}: " + " | ".join(parts))


def tensor_shapes(tensors: dict, source: str) -> dict[str, tuple]:
    """name -> shape of a state dict; CheckpointError for entries that are not tensors."""
    bad = [str(k) for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {_listing(bad, 5)}")
    return {k: tuple(v.shape) for k, v in tensors.items()}


def check_values(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor floating point and finite (CheckpointError naming the others)."""
    not_float = [k for k, v in tensors.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{source}: non-floating tensors: {_listing(not_float)}")
    not_finite = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if not_finite:
        raise CheckpointError(f"{source}: tensors with NaN/inf values: {_listing(not_finite)}")


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                hints: dict[str, str] | None = None) -> torch.nn.Module:
    """Check `tensors` against the module's state dict, then copy them in (a module built on the meta
    device gets CPU storage first; nothing keeps a reference to the file's tensors). Returns the
    module."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_tensors(tensor_shapes(tensors, source), expected, source, hints)
    if any(t.is_meta for t in module.state_dict().values()):
        module.to_empty(device="cpu")
    module.load_state_dict(tensors, strict=True)
    return module
