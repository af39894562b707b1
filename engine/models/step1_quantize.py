"""`stepvox quantize`: a Step1 folder with FP8 linear weights (kernels/fp8.py), written from a
released bf16 one tensor by tensor (never the whole model in memory), loadable as it is.

The new folder holds every file of the old one except its safetensors and config.json: shards of
at most `max_shard_bytes` with each layer's linear weights as float8_e4m3fn plus their per-row
float32 scales (`<name>_scale`), everything else as stored, an index, and the config.json with a
`quantization_config` (config.fp8_quantization_config). It is written beside the destination and
renamed into place when complete, so an interrupted run leaves no folder that looks whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from ..checks import read_json
from ..config import MAX_CONFIG_BYTES, Step1Config, fp8_quantization_config
from ..errors import CheckpointError, ConfigError
from stepvox.kernels.fp8 import quantize_rows
from .step1_checkpoint import INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE, CheckpointReader, expected_shapes, \
    quantized_names

MAX_SHARD_BYTES = 4 << 30


def quantize_folder(src: str, dst: str, *, lm_head: bool = False, device: str | torch.device = "cpu",
                    max_shard_bytes: int = MAX_SHARD_BYTES, progress=None) -> str:
    """Write the FP8 folder of Step1 folder `src` to `dst` (which must not exist); returns `dst`.
    `lm_head`: quantize the LM head too; `device`: where the scales are computed."""
    cfg = Step1Config.from_folder(src)
    if cfg.quantization is not None:
        raise CheckpointError(f"{src} is already quantized ({cfg.quantization})")
    if os.path.exists(dst):
        raise ConfigError(f"{dst} exists: give a new folder")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ConfigError(f"{dst}: no such folder {parent}")
    fp8 = set(quantized_names(cfg, lm_head))
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        with CheckpointReader(src, cfg) as reader:
            source_files = {os.path.basename(path) for path in reader.locations.values()}
            names = list(expected_shapes(cfg))
            weight_map, shard, shard_bytes, shards = {}, {}, 0, []
            total = 0

            def flush():
                nonlocal shard, shard_bytes
                if shard:
                    file = f"model-{len(shards) + 1:05d}.safetensors"
                    save_file(shard, os.path.join(work, file), metadata={"format": "pt"})
                    shards.append(file)
                    weight_map.update({name: file for name in shard})
                    shard, shard_bytes = {}, 0

            for n, name in enumerate(names):
                tensor = reader.get(name)[:]
                stored = dict(zip((name, name + SCALE_SUFFIX), _to_cpu(quantize_rows(tensor.to(device))))) \
                    if name in fp8 else {name: tensor.contiguous()}
                size = sum(t.numel() * t.element_size() for t in stored.values())
                if shard and shard_bytes + size > max_shard_bytes:
                    flush()
                shard.update(stored)
                shard_bytes += size
                total += size
                if progress is not None:
                    progress(n + 1, len(names))
            flush()
        if len(shards) == 1:
            os.rename(os.path.join(work, shards[0]), os.path.join(work, SINGLE_FILE))
        else:
            with open(os.path.join(work, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        raw = read_json(os.path.join(src, "config.json"), MAX_CONFIG_BYTES, "a config.json", CheckpointError)
        raw["quantization_config"] = fp8_quantization_config(lm_head)
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(raw, f, indent=2, ensure_ascii=False)
        _copy_the_rest(src, work, skip={SINGLE_FILE, INDEX_FILE, "config.json"} | source_files)
        os.rename(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _to_cpu(pair):
    return tuple(t.cpu().contiguous() for t in pair)


def _copy_the_rest(src: str, dst: str, skip: set[str]) -> None:
    """Every other file and folder of `src` (tokenizer, the TTS folder's CosyVoice decoders, ...)."""
    for entry in os.listdir(src):
        if entry in skip:
            continue
        path = os.path.join(src, entry)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dst, entry), symlinks=True)
        else:
            shutil.copy2(path, os.path.join(dst, entry), follow_symlinks=False)
