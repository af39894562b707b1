"""Load released flow.pt / hift.pt state dicts safely and strictly (SPEC.md §1.2, §3.3, §3.4).

`torch.load(weights_only=True)` only: the files are plain pickled OrderedDicts of fp32 tensors.
Keys and shapes are checked against the module the config describes before anything is copied,
so a wrong or mismatched file fails with the offending tensor names. Old-style weight norm
(`weight_g` / `weight_v`, or the newer `parametrizations.weight.original0/1`) is folded to a plain
weight, w = g * v / ||v|| with the norm over every dim but 0.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..audio.decoder_errors import (DecoderCheckpointError, MissingTensorsError, TensorShapeError,
                                    UnexpectedTensorsError)

# what a mismatch on these tensors most likely means
_HINTS = {
    "input_embedding.weight": "flow.vocab_size x flow.input_size",
    "spk_embed_affine_layer.weight": "flow.output_size x flow.spk_embed_dim",
    "encoder.embed.out.0.weight": "encoder.output_size x encoder.input_size",
    "conv_pre.weight_v": "hift.base_channels x hift.in_channels x 7",
}


def _is_weight_normed(module: nn.Module) -> bool:
    return bool(getattr(module, "stepvox_weight_norm", False))


def checkpoint_layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released file for `module` (weight-normed layers as weight_g/weight_v)."""
    layout = {}
    owners = dict(module.named_modules())
    for name, param in module.state_dict(keep_vars=True).items():
        prefix, _, leaf = name.rpartition(".")
        shape = tuple(param.shape)
        if leaf == "weight" and _is_weight_normed(owners.get(prefix, module)):
            layout[f"{prefix}.weight_g"] = (shape[0],) + (1,) * (len(shape) - 1)
            layout[f"{prefix}.weight_v"] = shape
        else:
            layout[name] = shape
    return layout


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; DecoderCheckpointError unless the result is a str->tensor dict."""
    if not os.path.isfile(path):
        raise DecoderCheckpointError(f"{path}: not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file to the caller
        raise DecoderCheckpointError(f"{path}: not a weights-only torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise DecoderCheckpointError(f"{path}: expected a state dict, found {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DecoderCheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return dict(data)


def _normalise_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.startswith("generator."):           # HiFiGan training checkpoints (upstream strips it too)
            key = key[len("generator."):]
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        out[key] = value
    return out


def _listing(names, limit=8) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict(sd: dict[str, torch.Tensor], layout: dict[str, tuple[int, ...]], source: str) -> None:
    missing = set(layout) - set(sd)
    if missing:
        raise MissingTensorsError(f"{source}: {len(missing)} tensors the config requires are missing: "
                                  f"{_listing(missing)}")
    unexpected = set(sd) - set(layout)
    if unexpected:
        raise UnexpectedTensorsError(f"{source}: {len(unexpected)} tensors the config does not describe: "
                                     f"{_listing(unexpected)}")
    wrong = [k for k in layout if tuple(sd[k].shape) != layout[k]]
    if wrong:
        detail = "; ".join(f"{k}: file {list(sd[k].shape)}, config {list(layout[k])}"
                           + (f" ({_HINTS[k]})" if k in _HINTS else "") for k in sorted(wrong)[:6])
        raise TensorShapeError(f"{source}: {len(wrong)} tensors disagree with cosyvoice.yaml: {detail}")
    not_float = [k for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise DecoderCheckpointError(f"{source}: non-floating tensors: {_listing(not_float)}")
    not_finite = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if not_finite:
        raise DecoderCheckpointError(f"{source}: tensors with NaN/inf values: {_listing(not_finite)}")


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    v32 = v.float()
    norm = v32.flatten(1).norm(dim=1).view((-1,) + (1,) * (v.dim() - 1))
    return g.float() * v32 / norm


def load_weights(module: nn.Module, path: str, device, dtype: torch.dtype) -> nn.Module:
    """Check `path` against `module` (built on the meta device or anywhere) and load it strictly.
    Returns the module on `device` in `dtype`."""
    sd = _normalise_names(read_state_dict(path))
    layout = checkpoint_layout(module)
    check_state_dict(sd, layout, os.path.basename(path))
    plain = {}
    for key in module.state_dict().keys():
        if key in sd:
            plain[key] = sd[key].float()
        else:
            prefix = key.rpartition(".")[0]
            plain[key] = fold_weight_norm(sd[f"{prefix}.weight_g"], sd[f"{prefix}.weight_v"])
    module.load_state_dict(plain, strict=True, assign=True)
    return module.to(device=device, dtype=dtype)
