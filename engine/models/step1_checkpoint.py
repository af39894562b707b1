"""Reading a Step1 model folder as released: config.json + safetensors (one file, or shards with
model.safetensors.index.json). Shapes are checked against the config before any tensor is read;
tensors are read through safetensors slices, so a tensor-parallel rank reads only its part.
"""
from __future__ import annotations

import os
from contextlib import ExitStack

from safetensors import safe_open

from ..config import Step1Config
from ..checks import read_json, shown
from ..errors import CheckpointError
from .weights import check_tensors

SCALE_SUFFIX = "_scale"          # an FP8 weight W's per-row scales are W's name + this
LINEAR_WEIGHTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_INDEX_BYTES = 64 << 20      # the 130B model's index is about 100 KB


def expected_shapes(cfg: Step1Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a released Step1 checkpoint (SPEC.md §2.1) and its shape."""
    h, kv, inter, vocab = cfg.hidden_size, cfg.kv_dim, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    return shapes


def quantized_names(cfg: Step1Config, lm_head: bool) -> list[str]:
    """The weights an FP8 folder stores in FP8 (with scales): every layer's linear weights, and the
    LM head when `lm_head`."""
    names = [f"model.layers.{i}.{w}" for i in range(cfg.num_hidden_layers) for w in LINEAR_WEIGHTS]
    return names + (["lm_head.weight"] if lm_head else [])


def stored_shapes(cfg: Step1Config) -> dict[str, tuple[int, ...]]:
    """expected_shapes plus, for an FP8 folder, one scale per row of each FP8 weight."""
    shapes = expected_shapes(cfg)
    if cfg.quantization == "fp8":
        for name in quantized_names(cfg, cfg.quantized_lm_head):
            shapes[name + SCALE_SUFFIX] = shapes[name][:1]
    return shapes


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_index(path: str) -> dict[str, str]:
    """The weight_map of a safetensors index: tensor name -> shard file name (a plain name in the
    folder: an index cannot point outside it)."""
    index = read_json(path, MAX_INDEX_BYTES, "an index", CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else index   # shown as found
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: not a safetensors index: expected an object with a weight_map object "
                              f"(tensor name -> shard file), found {shown(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.basename(shard) != shard or shard in (".", ".."):
            raise CheckpointError(f"{path}: weight_map[{shown(name)}] must name a shard file in the folder, "
                                  f"got {shown(shard)}")
    return weight_map


def _shard_map(folder: str) -> dict[str, str]:
    """tensor name -> shard file path."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_index(index)
        missing_files = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(folder, v))})
        if missing_files:
            raise CheckpointError(f"{folder}: shards named in the index are missing: {', '.join(missing_files)}")
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}")


class CheckpointReader:
    """Open shards of one folder; `get(name)` gives a safetensors slice (index it to read)."""

    def __init__(self, folder: str, cfg: Step1Config):
        self.folder = folder
        self.cfg = cfg
        self.locations = _shard_map(folder)
        self._stack = ExitStack()
        self._files: dict[str, object] = {}
        self.validate()

    def _file(self, path: str):
        if path not in self._files:
            self._files[path] = self._stack.enter_context(_open(path))
        return self._files[path]

    def validate(self) -> None:
        found = {}
        for name, path in self.locations.items():
            f = self._file(path)
            if name in f.keys():             # a name the index lists but its shard lacks counts as missing
                found[name] = tuple(f.get_slice(name).get_shape())
        check_tensors(found, stored_shapes(self.cfg), f"{self.folder} (against its config.json)")
        if self.cfg.quantization == "fp8":
            self._check_fp8_dtypes()

    def _check_fp8_dtypes(self) -> None:
        wrong = []
        for name in quantized_names(self.cfg, self.cfg.quantized_lm_head):
            for tensor, dtype in ((name, "F8_E4M3"), (name + SCALE_SUFFIX, "F32")):
                found = self.get(tensor).get_dtype()
                if found != dtype:
                    wrong.append(f"{tensor} is {found}, not {dtype}")
        if wrong:
            raise CheckpointError(f"{self.folder}: its config.json says FP8, but " + "; ".join(wrong[:5])
                                  + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""))

    def has(self, name: str) -> bool:
        return name in self.locations

    def get(self, name: str):
        return self._file(self.locations[name]).get_slice(name)

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
