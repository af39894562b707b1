"""Model config (config.json of a Step1 folder), the released model shapes, and engine options."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from stepvox.kernels import BACKENDS, KernelConfig

from . import checks
from . import special_tokens as st
from .device.block_tables import DeviceBlockTables
from .errors import CheckpointError, ConfigError

_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_attention_groups",
             "num_hidden_layers", "vocab_size")

# Upper bounds on config.json sizes: several times the largest released model's (CHAT_130B), and
# low enough that nothing sized from them is absurd (max_seq_len 1e12 once asked for 512 TB of
# block tables). vocab_size must also hold the speech tokens (ids up to 65536 + 5120).
CONFIG_LIMITS = dict(hidden_size=1 << 16, intermediate_size=1 << 18, num_attention_heads=1024,
                     num_hidden_layers=1024, vocab_size=1 << 22, max_seq_len=1 << 20)
MAX_CONFIG_BYTES = 1 << 20      # a config.json is a few hundred bytes; a bigger file is not one

# config.json shapes of the released models (SPEC.md §1.4), and a tiny one for tests and demos
TTS_3B = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=48, num_attention_groups=4,
              num_hidden_layers=32, vocab_size=74752, max_seq_len=32768)
CHAT_130B = dict(hidden_size=12288, intermediate_size=31232, num_attention_heads=96, num_attention_groups=8,
                 num_hidden_layers=88, vocab_size=74752, max_seq_len=32768)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_attention_groups=2,
            num_hidden_layers=2, vocab_size=74752, max_seq_len=2048)


def fp8_quantization_config(lm_head: bool) -> dict:
    """The config.json `quantization_config` of a folder `stepvox quantize` writes."""
    return {"quant_method": "fp8", "fmt": "e4m3", "weight_scale": "per_channel", "activation_scheme": "none",
            "lm_head": bool(lm_head)}


def _read_quantization(raw, source: str) -> tuple[str, bool]:
    expected = fp8_quantization_config(False)
    if not isinstance(raw, dict) or any(raw.get(k) != v for k, v in expected.items() if k != "lm_head") \
            or not isinstance(raw.get("lm_head", False), bool):
        raise CheckpointError(f"{source}: unsupported quantization_config {checks.shown(raw)}; stepvox reads FP8 "
                              f"e4m3 weights with per-channel scales ({expected}, lm_head true or false)")
    return "fp8", raw.get("lm_head", False)


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
    quantization: str | None = None    # "fp8": the folder stores FP8 linear weights (QUANTIZATION_CONFIG)
    quantized_lm_head: bool = False    # ... and an FP8 LM head

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_attention_groups * self.head_dim

    def tp_problem(self, tp: int) -> str | None:
        """Why `tp` ranks cannot split this model (KV groups, MLP width, vocabulary), or None."""
        for what, size in (("KV groups", self.num_attention_groups), ("intermediate size", self.intermediate_size),
                           ("vocabulary", self.vocab_size)):
            if size % tp:
                return f"tensor_parallel_size {tp} must divide the {size} {what}"
        return None

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json", limits: dict = CONFIG_LIMITS) -> "Step1Config":
        """The config of a config.json's contents; CheckpointError naming `source`, the field and the
        value for anything missing, mistyped or out of range (sizes above `limits` included)."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)}")
        model_type = raw.get("model_type", "step1")
        arch = raw.get("architectures") or ["Step1ForCausalLM"]
        if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
            raise CheckpointError(f"{source}: architectures must be a list of names, got {checks.shown(arch)}")
        if model_type != "step1" or "Step1ForCausalLM" not in arch:
            raise CheckpointError(f"{source}: not a Step1 model: model_type={checks.shown(model_type)}, "
                                  f"architectures={checks.shown(arch)}")

        def size(key: str, hi: int | None = None) -> int:
            return checks.integer(raw[key], f"{source}: {key}", CheckpointError, 1, hi or limits[key])

        def token_id(key: str, vocab: int) -> int:
            if raw.get(key) is None:        # absent or null (as HF configs write it): the default
                return getattr(cls, key)
            return checks.integer(raw[key], f"{source}: {key}", CheckpointError, 0, vocab - 1)

        heads = size("num_attention_heads")
        values = dict(hidden_size=size("hidden_size"), intermediate_size=size("intermediate_size"),
                      num_attention_heads=heads, num_attention_groups=size("num_attention_groups", heads),
                      num_hidden_layers=size("num_hidden_layers"))
        values["vocab_size"] = vocab = checks.integer(raw["vocab_size"], f"{source}: vocab_size", CheckpointError,
                                                      st.AUDIO_TOKENS_END, limits["vocab_size"])
        if "max_seq_len" in raw:
            values["max_seq_len"] = size("max_seq_len")
        if "rms_norm_eps" in raw:
            values["rms_norm_eps"] = checks.real(raw["rms_norm_eps"], f"{source}: rms_norm_eps", CheckpointError,
                                                 0.0, 0.1, lo_open=True)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            values[key] = token_id(key, vocab)
        if raw.get("quantization_config") is not None:
            values["quantization"], values["quantized_lm_head"] = _read_quantization(raw["quantization_config"], source)
        cfg = cls(**values)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"{source}: hidden_size {cfg.hidden_size} is not a multiple of "
                                  f"{cfg.num_attention_heads} heads")
        if cfg.num_attention_heads % cfg.num_attention_groups:
            raise CheckpointError(f"{source}: {cfg.num_attention_heads} heads do not divide into "
                                  f"{cfg.num_attention_groups} KV groups")
        return cfg

    @classmethod
    def from_shape(cls, shape: dict) -> "Step1Config":
        """The config of one of the shapes above (or any dict of config.json keys)."""
        return cls.from_dict(dict(shape))

    @classmethod
    def from_folder(cls, folder: str, limits: dict = CONFIG_LIMITS) -> "Step1Config":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder} has no config.json")
        raw = checks.read_json(path, MAX_CONFIG_BYTES, "a config.json", CheckpointError)
        return cls.from_dict(raw, path, limits)


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


ENGINE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_TENSOR_PARALLEL = 64          # ranks of one host (the TP executor starts them all on this machine)
MAX_PAGE_SIZE = 1024              # tokens per KV page
PAGE_BOOKKEEPING_BYTES = 256      # host bytes per KV page in the block manager (lists, free map, prefix keys)
_BOOLEAN_OPTIONS = ("enable_prefix_caching", "enforce_eager", "async_scheduling", "pdl", "fused_decode",
                    "triton_sampling", "quantize_lm_head", "custom_all_reduce", "split_mixed_steps",
                    "tensor_parallel_share_device")
QUANTIZATIONS = (None, "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")


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
    max_buffer_bytes: int = 1 << 30           # limit on what the options above make the engine allocate before
                                              # any request (step buffers, block tables, page lists): buffer_bytes
    quantization: str | None = None           # "fp8": quantize a bf16 folder's linear weights while loading
                                              # (an FP8 folder, `stepvox quantize`'s, loads as FP8 anyway)
    quantize_lm_head: bool = False            # with quantization="fp8": the LM head too
    max_prefill_while_decoding: int | None = 256  # prompt tokens a step computes while others decode (an
                                              # arrival's prefill spread over steps); None: max_num_batched_tokens
    split_mixed_steps: bool = True            # a step with prefill chunks runs as parts: the decodes' CUDA graph
                                              # and a graph per prefill chunk (its length bucket); False: one
                                              # eager forward (model_runner.py)
    custom_all_reduce: bool = False           # tensor parallelism on GPUs: activation sums through stepvox._C's
                                              # kernels (csrc/; off until they have been checked on a GPU)
    tensor_parallel_share_device: bool = False  # every rank on `device` (one GPU): other collectives through
                                              # gloo on host copies, no CUDA graphs, each rank 1/N of the memory
                                              # budget; checks tensor parallelism on one card, not for speed
    kv_cache_dtype: str = "auto"              # "auto": the model's dtype; "fp8": float8_e4m3fn with per-(layer,
                                              # KV head) scales calibrated at load (half the bytes per token)
    load_format: str = "safetensors"          # "dummy": random weights of the config's shapes, made on the
                                              # device (benchmarks of shapes too big for a disk)

    def validate(self, cfg: Step1Config | None = None) -> None:
        """Check every option's type and range (ConfigError naming the option and its value; numbers
        are normalised to Python ints and floats). With the model's config, also check the options
        against that model: see check_model."""
        def count(name: str, lo: int = 1, hi: int | None = None) -> None:
            setattr(self, name, checks.integer(getattr(self, name), name, ConfigError, lo, hi))

        self._check_device_and_dtype()
        if self.max_model_len is not None:
            count("max_model_len", hi=CONFIG_LIMITS["max_seq_len"])
        for name in ("max_num_seqs", "max_num_batched_tokens", "cuda_graph_max_batch"):
            count(name)
        count("page_size", hi=MAX_PAGE_SIZE)
        if self.num_kv_pages is not None:
            count("num_kv_pages")
        if self.max_prefill_while_decoding is not None:
            count("max_prefill_while_decoding")
        count("tensor_parallel_size", hi=MAX_TENSOR_PARALLEL)
        count("seed", 0, 2**63 - 1)
        count("gemv_max_rows", 0, 16)            # the GEMV kernel's limit
        count("max_buffer_bytes")
        self.gpu_memory_utilization = checks.real(self.gpu_memory_utilization, "gpu_memory_utilization", ConfigError,
                                                  0.0, 1.0, lo_open=True)
        for name in _BOOLEAN_OPTIONS:
            checks.flag(getattr(self, name), name, ConfigError)
        checks.one_of(self.distributed_executor, "distributed_executor", ConfigError, ("auto", "mp"))
        checks.one_of(self.kernel_backend, "kernel_backend", ConfigError, BACKENDS)
        if self.quantization is not None:
            checks.one_of(self.quantization, "quantization", ConfigError, QUANTIZATIONS[1:])
        checks.one_of(self.load_format, "load_format", ConfigError, ("safetensors", "dummy"))
        checks.one_of(self.kv_cache_dtype, "kv_cache_dtype", ConfigError, KV_CACHE_DTYPES)
        if self.quantize_lm_head and self.quantization != "fp8":
            raise ConfigError('quantize_lm_head goes with quantization="fp8"')
        if self.gemv_tiles is not None and not callable(self.gemv_tiles):
            raise ConfigError(f"gemv_tiles must be a function (N, K) -> tile config, "
                              f"got {checks.shown(self.gemv_tiles)}")
        self._check_buffers(self.max_model_len or 1)   # a lower bound until the model's context is known
        if cfg is not None:
            self.check_model(cfg)

    def _check_device_and_dtype(self) -> None:
        device = self.device
        if isinstance(device, str) and device != "auto":
            try:
                device = torch.device(device)
            except RuntimeError:
                device = None
        if not (device == "auto" or isinstance(device, torch.device) and device.type in ("cpu", "cuda")):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {checks.shown(self.device)}")
        if isinstance(self.dtype, torch.dtype):
            if self.dtype not in ENGINE_DTYPES:
                raise ConfigError(f"dtype must be one of {', '.join(map(str, ENGINE_DTYPES))}, got {self.dtype}")
        elif not isinstance(self.dtype, str) or (self.dtype != "auto" and self.dtype not in _DTYPES):
            raise ConfigError(f"dtype must be 'auto' or one of {', '.join(sorted(_DTYPES))}, "
                              f"got {checks.shown(self.dtype)}")

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type for a model computing in `model_dtype`."""
        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else model_dtype

    def fp8_weights(self, cfg: Step1Config) -> tuple[bool, bool]:
        """(linear weights in FP8, LM head in FP8) for the model of `cfg`: what the folder stores, or
        what these options quantize it to while loading."""
        fp8 = self.quantization == "fp8" or cfg.quantization == "fp8"
        return fp8, cfg.quantized_lm_head or (fp8 and self.quantize_lm_head)

    def check_model(self, cfg: Step1Config) -> None:
        """The options against the model (call after validate): the context fits its max_seq_len,
        the tensor-parallel size splits it, and the buffers sized by its context stay within
        max_buffer_bytes."""
        if self.max_model_len is not None and self.max_model_len > cfg.max_seq_len:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        problem = cfg.tp_problem(self.tensor_parallel_size)
        if problem:
            raise ConfigError(problem)
        self._check_buffers(self.max_model_len or cfg.max_seq_len)

    def buffer_bytes(self, model_len: int) -> dict[str, tuple[int, str]]:
        """What the options make the engine allocate before any request, for a context of
        `model_len` tokens: option -> (bytes, what). Staged step inputs come in three sets (two
        pinned host sets used by turns and the device set, device/staging.py); the decode graphs
        have their own inputs; the block tables live on the device with their own staging
        (device/block_tables.py); the block manager keeps per-page lists (model_runner.py, kv_cache.py)."""
        pages_per_seq = -(-model_len // self.page_size)
        graph_batch = min(self.cuda_graph_max_batch, self.max_num_seqs)
        token_rows = max(self.max_num_batched_tokens, graph_batch)
        seqs = self.max_num_seqs
        return {
            "max_num_batched_tokens": (3 * (3 * token_rows + 4 * self.max_num_batched_tokens + seqs) * 8,
                                       f"staged ids, slots and rows of {token_rows} tokens, and of prefill "
                                       f"chunks padded to their buckets"),
            "max_num_seqs": (DeviceBlockTables.buffer_bytes(seqs, pages_per_seq) + 3 * (4 * seqs + 1) * 4,
                             f"device block tables of {seqs} sequences x {pages_per_seq} pages "
                             f"(max_model_len {model_len} / page_size {self.page_size}) and their staging"),
            "cuda_graph_max_batch": (graph_batch * (3 * 8 + 4 + pages_per_seq * 4),
                                     f"decode-graph inputs of {graph_batch} sequences x {pages_per_seq} pages"),
            "num_kv_pages": ((self.num_kv_pages or 0) * PAGE_BOOKKEEPING_BYTES,
                             f"block-manager lists of {self.num_kv_pages} pages"),
        }

    def _check_buffers(self, model_len: int) -> None:
        parts = self.buffer_bytes(model_len)
        total = sum(b for b, _ in parts.values())
        if total <= self.max_buffer_bytes:
            return
        name, (_, what) = max(parts.items(), key=lambda item: item[1][0])
        raise ConfigError(f"{name}={getattr(self, name)} needs {total / 2**20:,.0f} MiB of host and device buffers "
                          f"before any request (mostly {what}), over the limit max_buffer_bytes="
                          f"{self.max_buffer_bytes} ({self.max_buffer_bytes / 2**20:,.0f} MiB); lower {name} "
                          f"or raise max_buffer_bytes")

    @property
    def kernels(self) -> KernelConfig:
        return KernelConfig(backend=self.kernel_backend, pdl=bool(self.pdl))

    def model_len(self, cfg: Step1Config) -> int:
        """The context the engine serves: max_model_len, or the model's max_seq_len. Every sizing
        starts here, so the options are checked against the model first (ConfigError)."""
        self.check_model(cfg)
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
