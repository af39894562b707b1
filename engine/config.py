"""Model config (config.json of a Step1 folder), the released model shapes, and engine options."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import torch

from stepvox.kernels import BACKENDS, KernelConfig

from .errors import CheckpointError, ConfigError

_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_attention_groups",
             "num_hidden_layers", "vocab_size")


# config.json shapes of the released models (SPEC.md §1.4), and a tiny one for tests and demos
TTS_3B = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=48, num_attention_groups=4,
              num_hidden_layers=32, vocab_size=74752, max_seq_len=32768)
CHAT_130B = dict(hidden_size=12288, intermediate_size=31232, num_attention_heads=96, num_attention_groups=8,
                 num_hidden_layers=88, vocab_size=74752, max_seq_len=32768)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_attention_groups=2,
            num_hidden_layers=2, vocab_size=74752, max_seq_len=2048)


@dataclasses.dataclass(frozen=True)
class Step1Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_attention_groups: int          # KV heads
    num_hidden_layers: int
    vocab_size: int
    max_seq_len: int = 32768
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 1
    eos_token_id: int = 3
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_attention_groups * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict) -> "Step1Config":
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)}")
        arch = raw.get("architectures") or ["Step1ForCausalLM"]
        if raw.get("model_type", "step1") != "step1" or "Step1ForCausalLM" not in arch:
            raise CheckpointError(f"not a Step1 model: model_type={raw.get('model_type')!r}, architectures={arch}")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads")
        if cfg.num_attention_heads % cfg.num_attention_groups:
            raise CheckpointError(f"{cfg.num_attention_heads} heads do not divide into {cfg.num_attention_groups} KV groups")
        return cfg

    @classmethod
    def from_shape(cls, shape: dict) -> "Step1Config":
        """The config of one of the shapes above (or any dict of config.json keys)."""
        return cls.from_dict(dict(shape))

    @classmethod
    def from_folder(cls, folder: str) -> "Step1Config":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder} has no config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclasses.dataclass
class EngineConfig:
    """Options of an LLM engine (vLLM's names where they exist)."""
    device: str = "auto"                      # "cuda", "cuda:1", "cpu"; auto = cuda if available
    dtype: str | torch.dtype = "auto"         # auto: bf16 on GPU, fp32 on CPU
    max_model_len: int | None = None          # default: the config's max_seq_len
    max_num_seqs: int = 256                   # running requests at once
    max_num_batched_tokens: int = 2048        # tokens computed per step (prefill chunks + decodes)
    page_size: int = 16                       # tokens per KV page
    num_kv_pages: int | None = None           # explicit KV cache size; overrides the fraction below
    gpu_memory_utilization: float = 0.90      # fraction of the GPU the engine may fill (weights + KV + activations)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False               # True: no CUDA graphs
    cuda_graph_max_batch: int = 256           # largest decode batch captured in a graph
    tensor_parallel_size: int = 1
    distributed_executor: str = "auto"        # "auto": in-process for one rank; "mp": worker processes (any size)
    seed: int = 0
    async_scheduling: bool = True             # launch a decode step before the host has read the previous
                                              # one's tokens (any executor; see llm_engine.py)
    kernel_backend: str = "auto"              # "auto" | "triton" | "reference" (stepvox.kernels.backend)
    pdl: bool = True                          # programmatic dependent launch of decode-step kernels (Hopper)
    fused_decode: bool = True                 # steps of <= 16 tokens on one GPU run the fused layer (step1.py)
    gemv_max_rows: int = 16                   # products of up to this many rows take the GEMV kernel on GPUs
    triton_sampling: bool = True              # greedy / top-k <= 64 rows drawn by the Triton kernels on GPUs
    gemv_tiles: Callable[[int, int], dict | None] | None = None   # (N, K) of a GEMV product -> its tile config
                                              # instead of kernels.gemv.gemv_config's (tile sweeps)

    def validate(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.page_size < 1:
            raise ConfigError("max_num_seqs, max_num_batched_tokens and page_size must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_pages is not None and self.num_kv_pages < 1:
            raise ConfigError(f"num_kv_pages must be positive, got {self.num_kv_pages}")
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be at least 1")
        if self.distributed_executor not in ("auto", "mp"):
            raise ConfigError(f"distributed_executor must be 'auto' or 'mp', got {self.distributed_executor!r}")
        if self.kernel_backend not in BACKENDS:
            raise ConfigError(f"kernel_backend must be one of {BACKENDS}, got {self.kernel_backend!r}")
        if not 0 <= self.gemv_max_rows <= 16:
            raise ConfigError(f"gemv_max_rows must be in [0, 16] (the GEMV kernel's limit), got {self.gemv_max_rows}")

    @property
    def kernels(self) -> KernelConfig:
        return KernelConfig(backend=self.kernel_backend, pdl=bool(self.pdl))

    def model_len(self, cfg: Step1Config) -> int:
        """The context the engine serves: max_model_len, or the model's max_seq_len."""
        return self.max_model_len or cfg.max_seq_len

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA device is available")
        return device
