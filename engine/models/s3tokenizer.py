"""The semantic (vq06) tokenizer: CosyVoice's S3 tokenizer v1, 25 Hz variant (SPEC.md §5), as a
native PyTorch module whose weights are read from `speech_tokenizer_v1.onnx`.

Model: conv1 (k3, stride 2) + GELU, conv2 (k3, stride 2) + GELU, + stored positional table,
6 pre-LN Whisper blocks (20 heads; key without bias; q and k each scaled by dh^-0.25), no final
LayerNorm, L2-normalise, nearest codebook row. Batches of pieces of different lengths are padded
and masked (features zeroed past each length before both convs, padded keys masked), so a piece
gets the same codes alone or in a batch.

ONNX -> torch names (the released file names its convs, positional table and LayerNorms, and
leaves matmul weights anonymous, identified by the consuming node): `/blocks.{i}/attn/query/MatMul`
-> blocks.{i}.attn.query.weight (ONNX keeps (in, out): transposed), `.../Add` -> bias;
`/blocks.{i}/mlp/mlp.{0,2}/...` likewise; LayerNorms by initializer name or, if anonymous, by
their LayerNormalization node or decomposed `.../Mul` (weight) and `.../Add_1` (bias); the
codebook is the `_codebook/MatMul` (or `Pow_1`) input, stored [D, K] and transposed to [K, D].
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..audio.tokenizer_errors import TokenizerCheckpointError
from ..device_copy import to_device
from ..audio.tokenizer_whisper_mel import whisper_log_mel
from ..onnx_weights import OnnxWeights, read_onnx_weights
from ...kernels.nearest_centroid import nearest_centroid

PIECE_SAMPLES = 30 * 16000       # Step-Audio feeds the S3 tokenizer independent <= 30 s pieces
MIN_PIECE_SAMPLES = 480          # ... and drops a trailing piece shorter than 30 ms
LN_EPS = 1e-5
L2_EPS = 1e-12
CACHE_SUFFIX = ".stepvox.safetensors"


@dataclass(frozen=True)
class S3Config:
    n_mels: int = 128
    n_ctx: int = 1500
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    codebook_size: int = 4096
    conv1_stride: int = 2


class _Attention(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query = torch.nn.Linear(d, d)
        self.key = torch.nn.Linear(d, d, bias=False)
        self.value = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, d)


class _Block(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn_ln = torch.nn.LayerNorm(d, eps=LN_EPS)
        self.attn = _Attention(d)
        self.mlp_ln = torch.nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))


class _Encoder(torch.nn.Module):
    def __init__(self, cfg: S3Config):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(cfg.n_mels, cfg.n_state, 3, stride=cfg.conv1_stride, padding=1)
        self.conv2 = torch.nn.Conv1d(cfg.n_state, cfg.n_state, 3, stride=2, padding=1)
        self.positional_embedding = torch.nn.Parameter(torch.zeros(cfg.n_ctx, cfg.n_state))
        self.blocks = torch.nn.ModuleList([_Block(cfg.n_state) for _ in range(cfg.n_layer)])


class _Codebook(torch.nn.Module):
    def __init__(self, cfg: S3Config):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.zeros(cfg.codebook_size, cfg.n_state))


class _Quantizer(torch.nn.Module):
    def __init__(self, cfg: S3Config):
        super().__init__()
        self._codebook = _Codebook(cfg)


def conv_out_len(n: torch.Tensor | int, stride: int):
    return (n + 2 - 3) // stride + 1


class S3Tokenizer(torch.nn.Module):
    def __init__(self, cfg: S3Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = _Encoder(cfg)
        self.quantizer = _Quantizer(cfg)
        self._sqnorm = None

    @property
    def device(self) -> torch.device:
        return self.encoder.positional_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.positional_embedding.dtype

    def output_lengths(self, mel_len: torch.Tensor) -> torch.Tensor:
        return conv_out_len(conv_out_len(mel_len, self.cfg.conv1_stride), 2)

    def encode_mel(self, mel: torch.Tensor, mel_len: torch.Tensor, padded: bool | None = None) -> torch.Tensor:
        """Hidden states [B, T', D] (before normalisation) of padded mel [B, n_mels, T].
        `padded`: whether any piece is shorter than T (then padded keys are masked); None reads
        it from `mel_len` (a host sync). Graph-capturable when given."""
        enc = self.encoder
        x = mel.to(self.dtype)
        t = torch.arange(x.shape[-1], device=x.device)
        x = x * (t[None, :] < mel_len[:, None])[:, None, :].to(x.dtype)
        # float32 means float32: cuDNN would run these convolutions in TF32 by default, and the
        # codes of a batch would then differ from the codes of its utterances one by one
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            x = F.gelu(enc.conv1(x))
            len1 = conv_out_len(mel_len, self.cfg.conv1_stride)
            t = torch.arange(x.shape[-1], device=x.device)
            x = x * (t[None, :] < len1[:, None])[:, None, :].to(x.dtype)
            x = F.gelu(enc.conv2(x))
        len2 = conv_out_len(len1, 2)
        x = x.transpose(1, 2)
        if x.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"S3 tokenizer: {x.shape[1]} frames exceed the {self.cfg.n_ctx}-row positional table")
        x = x + enc.positional_embedding[: x.shape[1]]
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < len2[:, None]      # [B, T']
        if padded is None:
            padded = not bool(keep.all())
        mask = keep[:, None, None, :] if padded else None
        b, n, d = x.shape
        h = self.cfg.n_head
        for blk in enc.blocks:
            y = F.layer_norm(x, (d,), blk.attn_ln.weight, blk.attn_ln.bias, LN_EPS)
            q = F.linear(y, blk.attn.query.weight, blk.attn.query.bias).view(b, n, h, -1).transpose(1, 2)
            k = F.linear(y, blk.attn.key.weight).view(b, n, h, -1).transpose(1, 2)
            v = F.linear(y, blk.attn.value.weight, blk.attn.value.bias).view(b, n, h, -1).transpose(1, 2)
            # (q * dh^-1/4)(k * dh^-1/4)^T = q k^T / sqrt(dh): SDPA's default scale
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + F.linear(a.transpose(1, 2).reshape(b, n, d), blk.attn.out.weight, blk.attn.out.bias)
            y = F.layer_norm(x, (d,), blk.mlp_ln.weight, blk.mlp_ln.bias, LN_EPS)
            x = x + blk.mlp(y)
        return x

    def quantize(self, hidden: torch.Tensor) -> torch.Tensor:
        """Codes of hidden rows [N, D]: L2-normalise (float32), then the nearest codebook row."""
        if self._sqnorm is None or self._sqnorm.device != hidden.device:
            self._sqnorm = self.quantizer._codebook.embed.float().pow(2).sum(-1)
        x = F.normalize(hidden.float(), p=2.0, dim=-1, eps=L2_EPS)
        return nearest_centroid(x, self.quantizer._codebook.embed, self._sqnorm)

    def forward(self, mel: torch.Tensor, mel_len: torch.Tensor, padded: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encode_mel(mel, mel_len, padded)
        codes = self.quantize(hidden.reshape(-1, hidden.shape[-1])).view(hidden.shape[:2])
        return codes, self.output_lengths(mel_len)

    def code_count(self, mel_frames: int) -> int:
        return int(self.output_lengths(mel_frames))

    def group_pieces(self, mel_frames: list[int], max_batch_frames: int = 16 * 3000,
                     max_batch: int | None = None) -> list[list[int]]:
        """Batches of piece indices, longest first, each within `max_batch_frames` padded frames
        (and `max_batch` pieces)."""
        order = sorted(range(len(mel_frames)), key=lambda i: -mel_frames[i])
        groups, start = [], 0
        while start < len(order):
            size = max(1, max_batch_frames // max(mel_frames[order[start]], 1))
            if max_batch:
                size = min(size, max_batch)
            groups.append(order[start:start + size])
            start += len(groups[-1])
        return groups

    def batch_mels(self, mels: list[torch.Tensor], length: int | None = None, batch: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(mel [B, n_mels, T], mel_len [B], padded) of pieces' mels, zero-padded to `length`
        frames and with full-length silent pieces appended up to `batch` (both optional).
        The length tensor is copied from the host without a device sync."""
        lens = [m.shape[-1] for m in mels]
        length = max(lens) if length is None else length
        batch = len(mels) if batch is None else batch
        out = torch.zeros(batch, self.cfg.n_mels, length, device=self.device)
        for j, m in enumerate(mels):
            out[j, :, :lens[j]] = m
        lens += [length] * (batch - len(mels))
        return out, to_device(torch.tensor(lens), self.device), any(n < length for n in lens)

    def tokenize_pieces(self, pieces: list[torch.Tensor], max_batch_frames: int = 16 * 3000) -> list[torch.Tensor]:
        """Codes of independent 16 kHz pieces (each <= 30 s), batched up to `max_batch_frames` mel frames."""
        mels = [whisper_log_mel(p.to(self.device), self.cfg.n_mels) for p in pieces]
        frames = [m.shape[-1] for m in mels]
        out: list[torch.Tensor | None] = [None] * len(mels)
        for group in self.group_pieces(frames, max_batch_frames):
            codes, _ = self(*self.batch_mels([mels[i] for i in group]))
            for j, i in enumerate(group):
                out[i] = codes[j, : self.code_count(frames[i])]
        return out


def split_pieces(wav: torch.Tensor) -> list[torch.Tensor]:
    """Step-Audio's `split_audio`: consecutive 30 s pieces; a trailing piece under 480 samples is dropped."""
    pieces = [wav[i:i + PIECE_SAMPLES] for i in range(0, wav.numel(), PIECE_SAMPLES)]
    return [p for p in pieces if p.numel() >= MIN_PIECE_SAMPLES]


# ---------------------------------------------------------------------------------- ONNX -> torch
_BLOCK_NODE = re.compile(r"^/blocks\.(\d+)/(attn/(query|key|value|out)|mlp/mlp\.(0|2)|attn_ln|mlp_ln)/"
                         r"(MatMul|Add|Add_1|Mul|LayerNormalization)$")
_NAMED = re.compile(r"^encoders\.(conv[12]\.(weight|bias)|positional_embedding|"
                    r"blocks\.\d+\.(attn_ln|mlp_ln)\.(weight|bias))$")


def _block_key(m: re.Match, op: str, index: int) -> tuple[str, bool] | None:
    """torch key and whether to transpose, for an initializer feeding input `index` of the block
    node matched by `m`, whose name ends in `op` (MatMul, Add, Add_1, Mul, LayerNormalization)."""
    i, part = m.group(1), m.group(2)
    if part in ("attn_ln", "mlp_ln"):
        if op == "LayerNormalization":
            return {1: (f"encoder.blocks.{i}.{part}.weight", False),
                    2: (f"encoder.blocks.{i}.{part}.bias", False)}.get(index)
        if op == "Mul":
            return f"encoder.blocks.{i}.{part}.weight", False
        if op == "Add_1":
            return f"encoder.blocks.{i}.{part}.bias", False
        return None                                   # the eps of a decomposed LayerNorm
    name = part.replace("mlp/mlp.", "mlp.").replace("/", ".")
    if op == "MatMul":
        return f"encoder.blocks.{i}.{name}.weight", True
    if op == "Add":
        return f"encoder.blocks.{i}.{name}.bias", False
    return None


def s3_tensors_from_onnx(w: OnnxWeights) -> tuple[S3Config, dict[str, torch.Tensor]]:
    """The torch state dict (and config) of an S3 v1 ONNX file, from its initializers."""
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    codebook_candidates = []
    conv_nodes = {}
    for name, array in w.initializers.items():
        users = w.consumers.get(name, [])
        if _NAMED.match(name):
            tensors["encoder." + name[len("encoders."):]] = torch.from_numpy(array.copy())
            continue
        placed = False
        for c in users:
            m = _BLOCK_NODE.match(c.node)
            if m:
                key = _block_key(m, m.group(5), c.index)
                if key:
                    arr = array.T if key[1] and array.ndim == 2 else array
                    tensors[key[0]] = torch.from_numpy(np.array(arr, copy=True, order="C"))
                    placed = True
            elif "/quantizer/" in c.node and "_codebook" in c.node and array.ndim == 2:
                codebook_candidates.append((c.node, name, array))
                placed = True
            elif c.op_type == "Conv" and c.index in (1, 2):
                conv_nodes.setdefault(c.node, {})[c.index] = array
                placed = True
        if not placed and array.dtype.kind == "f" and array.size > 1:
            unknown.append(f"{name} {tuple(array.shape)} (used by {', '.join(c.node for c in users) or 'nothing'})")
    # anonymous conv weights: first Conv node -> conv1, second -> conv2
    for n, (node, arrays) in enumerate(sorted(conv_nodes.items(), key=lambda kv: kv[0])):
        conv = "conv1" if "conv1" in node else "conv2" if "conv2" in node else f"conv{n + 1}"
        for index, suffix in ((1, "weight"), (2, "bias")):
            key = f"encoder.{conv}.{suffix}"
            if index in arrays and key not in tensors:
                tensors[key] = torch.from_numpy(arrays[index].copy())
    if unknown:
        raise TokenizerCheckpointError(f"{w.path}: initializers not part of the S3 v1 layout: " + "; ".join(unknown[:8]))
    conv1 = tensors.get("encoder.conv1.weight")
    pos = tensors.get("encoder.positional_embedding")
    if conv1 is None or pos is None:
        raise TokenizerCheckpointError(f"{w.path}: no conv1 weight / positional_embedding initializer found")
    n_state, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    if codebook_candidates:
        codebook_candidates.sort(key=lambda t: (not t[0].endswith("_codebook/MatMul"), t[0]))
        _, _, cb = codebook_candidates[0]
        if cb.shape[0] == n_state and cb.shape[1] != n_state:
            cb = cb.T
        tensors["quantizer._codebook.embed"] = torch.from_numpy(np.array(cb, copy=True, order="C"))
    n_layer = 1 + max([int(k.split(".")[2]) for k in tensors if k.startswith("encoder.blocks.")], default=-1)
    stride = w.node_attributes.get("/conv1/Conv", {}).get("strides", [2])[0]
    n_head = n_state // 64
    heads = w.node_attributes.get("/blocks.0/attn/Constant_1", {}).get("value")
    if heads is not None and np.size(heads) == 1 and int(np.ravel(heads)[0]) > 0 \
            and n_state % int(np.ravel(heads)[0]) == 0:
        n_head = int(np.ravel(heads)[0])
    codebook = tensors.get("quantizer._codebook.embed")
    cfg = S3Config(n_mels=n_mels, n_ctx=int(pos.shape[0]), n_state=n_state, n_head=n_head, n_layer=n_layer,
                   codebook_size=int(codebook.shape[0]) if codebook is not None else 4096,
                   conv1_stride=int(stride))
    return cfg, tensors


def _check_and_load(model: torch.nn.Module, tensors: dict, where: str) -> None:
    from .paraformer import check_and_load
    check_and_load(model, tensors, where)


def _cache_metadata(onnx_path: str, cfg: S3Config) -> dict[str, str]:
    st = os.stat(onnx_path)
    meta = {k: str(v) for k, v in asdict(cfg).items()}
    meta.update(onnx_size=str(st.st_size), onnx_mtime_ns=str(st.st_mtime_ns))
    return meta


def _read_cache(onnx_path: str):
    from safetensors import safe_open
    path = onnx_path + CACHE_SUFFIX
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            st = os.stat(onnx_path)
            if meta.get("onnx_size") != str(st.st_size) or meta.get("onnx_mtime_ns") != str(st.st_mtime_ns):
                return None
            cfg = S3Config(**{k: int(meta[k]) for k in asdict(S3Config()) if k in meta})
            return cfg, {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - a stale or broken cache is rebuilt, never trusted
        return None


def load_s3_tokenizer(onnx_path: str | os.PathLike, device="cpu", dtype=torch.float32,
                      cache: bool = True) -> S3Tokenizer:
    """Build the native S3 tokenizer from the ONNX file's initializers (nothing is executed).
    With `cache`, the converted weights are kept beside it as `<file>.stepvox.safetensors`
    (checked against the ONNX file's size and mtime) when the folder is writable."""
    onnx_path = os.fspath(onnx_path)
    if not os.path.exists(onnx_path):
        raise TokenizerCheckpointError(f"missing S3 tokenizer file {onnx_path}")
    cached = _read_cache(onnx_path) if cache else None
    if cached is not None:
        cfg, tensors = cached
    else:
        cfg, tensors = s3_tensors_from_onnx(read_onnx_weights(onnx_path))
    with torch.device("meta"):
        model = S3Tokenizer(cfg)
    model = model.to_empty(device="cpu")
    _check_and_load(model, tensors, onnx_path)
    if cache and cached is None:
        try:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in tensors.items()}, onnx_path + CACHE_SUFFIX,
                      metadata=_cache_metadata(onnx_path, cfg))
        except OSError:
            pass                      # read-only model folder: convert again next time
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.quantizer._codebook.embed.data = model.quantizer._codebook.embed.data.float()   # search in fp32
    return model
