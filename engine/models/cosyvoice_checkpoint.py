"""Loading the released flow.pt / hift.pt (SPEC.md §1.2, §3.3, §3.4) through the strict loader.

The files are plain pickled OrderedDicts of fp32 tensors (read with weights_only=True). Old-style
weight norm (`weight_g` / `weight_v`, or the newer `parametrizations.weight.original0/1`) is folded
to a plain weight, w = g * v / ||v|| with the norm over every dim but 0, after the file's keys and
shapes have been checked against the released layout of the module the config describes.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .weights import check_tensors, check_values, read_torch_state_dict, tensor_shapes

# what a mismatch on these tensors most likely means
_HINTS = {
    "input_embedding.weight": "flow.vocab_size x flow.input_size",
    "spk_embed_affine_layer.weight": "flow.output_size x flow.spk_embed_dim",
    "encoder.embed.out.0.weight": "encoder.output_size x encoder.input_size",
    "conv_pre.weight_v": "hift.base_channels x hift.in_channels x 7",
}


def weight_normed(module: nn.Module) -> nn.Module:
    """Mark a layer whose released weights are stored as weight_g / weight_v."""
    module.stepvox_weight_norm = True
    return module


def checkpoint_layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released file for `module` (weight-normed layers as weight_g/weight_v)."""
    layout = {}
    owners = dict(module.named_modules())
    for name, param in module.state_dict(keep_vars=True).items():
        prefix, _, leaf = name.rpartition(".")
        shape = tuple(param.shape)
        if leaf == "weight" and getattr(owners.get(prefix, module), "stepvox_weight_norm", False):
            layout[f"{prefix}.weight_g"] = (shape[0],) + (1,) * (len(shape) - 1)
            layout[f"{prefix}.weight_v"] = shape
        else:
            layout[name] = shape
    return layout


def _normalise_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if isinstance(key, str):
            if key.startswith("generator."):           # HiFiGan training checkpoints (upstream strips it too)
                key = key[len("generator."):]
            key = key.replace(".parametrizations.weight.original0", ".weight_g")
            key = key.replace(".parametrizations.weight.original1", ".weight_v")
        out[key] = value
    return out


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    v32 = v.float()
    norm = v32.flatten(1).norm(dim=1).view((-1,) + (1,) * (v.dim() - 1))
    return g.float() * v32 / norm


def load_weights(module: nn.Module, path: str, device, dtype: torch.dtype) -> nn.Module:
    """Check `path` against `module` (built on the meta device or anywhere) and load it strictly.
    Returns the module on `device` in `dtype`."""
    sd = _normalise_names(read_torch_state_dict(path))
    source = os.path.basename(path)
    check_tensors(tensor_shapes(sd, source), checkpoint_layout(module), source, _HINTS)
    check_values(sd, source)
    plain = {}
    for key in module.state_dict().keys():
        if key in sd:
            plain[key] = sd[key].float()
        else:
            prefix = key.rpartition(".")[0]
            plain[key] = fold_weight_norm(sd[f"{prefix}.weight_g"], sd[f"{prefix}.weight_v"])
    module.load_state_dict(plain, strict=True, assign=True)
    return module.to(device=device, dtype=dtype)
