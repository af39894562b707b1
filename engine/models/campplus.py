"""CAM++ speaker embedding through the released campplus.onnx (SPEC.md §6).

16 kHz audio -> Kaldi fbank (80 bins, dither 0) minus its time mean -> ONNX input [1, T, 80]
(first input, name read from the model) -> output flattened to the embedding (192 floats).
onnxruntime on the CPU, as the official front end; the prompt embedding is computed once per
speaker, so a native port would not change decoding latency.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime
import torch

from ..errors import AudioTooShortError, CheckpointError
from ..frontend.fbank import campplus_features

MIN_SAMPLES_16K = 400      # one 25 ms fbank frame


class CampPlus:
    def __init__(self, path: str, embed_dim: int = 192, threads: int = 1):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: not found")
        opts = onnxruntime.SessionOptions()
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several private types
            raise CheckpointError(f"{path}: not a loadable ONNX model ({exc})") from exc
        inputs = self.session.get_inputs()
        if not inputs:
            raise CheckpointError(f"{path}: the model has no inputs")
        shape = inputs[0].shape
        if len(shape) != 3 or (isinstance(shape[2], int) and shape[2] != 80):
            raise CheckpointError(f"{path}: first input must be [batch, frames, 80], got {shape}")
        self.input_name = inputs[0].name
        self.embed_dim = embed_dim
        self.path = path

    def embed(self, wav16k: torch.Tensor) -> torch.Tensor:
        """[N] float 16 kHz audio in [-1, 1] -> [embed_dim] float32 (CPU)."""
        wav16k = wav16k.detach().reshape(-1).float().cpu()
        if wav16k.numel() < MIN_SAMPLES_16K:
            raise AudioTooShortError(f"speaker audio too short: {wav16k.numel()} samples at 16 kHz, need {MIN_SAMPLES_16K}")
        feat = campplus_features(wav16k)[None].numpy().astype(np.float32)
        out = np.asarray(self.session.run(None, {self.input_name: feat})[0], dtype=np.float32).reshape(-1)
        if out.size != self.embed_dim:
            raise CheckpointError(f"{self.path}: embedding has {out.size} values, the flow expects {self.embed_dim}")
        return torch.from_numpy(out.copy())
