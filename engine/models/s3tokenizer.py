"""The semantic (vq06) tokenizer: CosyVoice's S3 tokenizer v1, 25 Hz variant (SPEC.md §5), as a
native PyTorch module whose weights are read from `speech_tokenizer_v1.onnx`.

Model: conv1 (k3, stride 2) + GELU, conv2 (k3, stride 2) + GELU, + stored positional table,
6 pre-LN Whisper blocks (20 heads of 64 dims; key without bias; q and k each scaled by dh^-0.25), no
final LayerNorm, L2-normalise, nearest codebook row. Batches of pieces of different lengths are padded
and masked (features zeroed past each length before both convs, padded keys masked), so a piece
gets the same codes alone or in a batch.

ONNX -> torch names (the released file names its convs, positional table and LayerNorms, and
leaves matmul weights anonymous, identified by the consuming node): `/blocks.{i}/attn/query/MatMul`
-> blocks.{i}.attn.query.weight (ONNX keeps (in, out): transposed), `.../Add` -> bias;
`/blocks.{i}/mlp/mlp.{0,2}/...` likewise; LayerNorms by initializer name (`encoders.`-prefixed as
released, or bare as torch.onnx.export names module parameters) or, if anonymous, by their
LayerNormalization node or decomposed `.../Mul` (weight) and `.../Add_1` (bias); the codebook is the
`_codebook/MatMul` (or `Pow_1`) input, stored [D, K] and transposed to [K, D].

The head count is v1's head dim of 64 (n_state // 64), cross-checked against the attention's
Reshape nodes where their shape folds from constants: no single graph constant states the head
count across exporters (in a torch.onnx.export, `/blocks.0/attn/Constant_1` is a Gather index).
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ...kernels import KernelConfig
from ...kernels.nearest_centroid import nearest_centroid
from ..device.graphs import GraphCache, bucket_batch, bucket_length
from ..device.precision import matmul_precision
from ..device.staging import to_device
from ..errors import CheckpointError
from ..frontend.whisper_mel import HOP as MEL_HOP
from .onnx_weights import OnnxWeights, read_onnx_weights
from .weights import load_strict

PIECE_SAMPLES = 30 * 16000       # Step-Audio feeds the S3 tokenizer independent <= 30 s pieces
MIN_PIECE_SAMPLES = 480          # ... and drops a trailing piece shorter than 30 ms
LN_EPS = 1e-5
L2_EPS = 1e-12
HEAD_DIM = 64                    # S3 v1: 20 heads x 64 of n_state 1280
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
    def __init__(self, cfg: S3Config, kernels: KernelConfig = KernelConfig()):
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
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
        return nearest_centroid(x, self.quantizer._codebook.embed, self._sqnorm, backend=self.kernels.backend)

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

def split_pieces(wav: torch.Tensor) -> list[torch.Tensor]:
    """Step-Audio's `split_audio`: consecutive 30 s pieces; a trailing piece under 480 samples is dropped."""
    pieces = [wav[i:i + PIECE_SAMPLES] for i in range(0, wav.numel(), PIECE_SAMPLES)]
    return [p for p in pieces if p.numel() >= MIN_PIECE_SAMPLES]


MEL_UNIT = 100                          # graph buckets of mel frames: whole seconds up to 5 s,
MEL_GEOMETRIC_AFTER = 5                 # then steps of ~x1.25,
MEL_CAP = PIECE_SAMPLES // MEL_HOP      # up to the 30 s piece
GRAPH_BATCH = 16                        # pieces per batch when graphs (or bucket padding) are on
MAX_BATCH_FRAMES = 16 * 3000            # padded mel frames per eager batch


class SemanticTokenizer:
    """vq06 codes of independent <= 30 s pieces from their Whisper mels, batched.

    Pieces are grouped longest first; with CUDA graphs each group is padded to a (batch, mel-length)
    bucket and replays that bucket's graph of the encoder + code search, on a side stream of its own
    so that it can run beside the Paraformer (`bucket_eager` pads eager runs the same way, which is
    how the CPU tests exercise the graphs' inputs)."""

    def __init__(self, model: S3Tokenizer, *, use_cuda_graphs: bool = True, bucket_eager: bool = False,
                 tf32: bool = False):
        self.model = model
        self.device = model.device
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.bucket_eager = bucket_eager
        self.tf32 = tf32
        self.graphs = GraphCache(self._body, self._static, self.device)
        self._side_stream = None

    @property
    def graph_count(self) -> int:
        return len(self.graphs)

    def code_count(self, mel_frames: int) -> int:
        return self.model.code_count(mel_frames)

    def _body(self, key, mel, mel_len) -> torch.Tensor:
        with matmul_precision(self.tf32, self.device):
            return self.model(mel, mel_len, key[2])[0]

    def _static(self, key):
        batch, frames, _ = key
        return (torch.zeros(batch, self.model.cfg.n_mels, frames, device=self.device),
                torch.full((batch,), frames, device=self.device, dtype=torch.long))

    def _side(self):
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def launch(self, mels: list[torch.Tensor], wait: bool = True, max_batch_frames: int = MAX_BATCH_FRAMES):
        """Enqueue the codes (device tensors, one per piece) of pieces given their mels. With graphs
        the replays go to the side stream (all of them: graphs of one pool never overlap); with
        `wait` the current stream waits for it before returning, else the caller makes it wait once
        it has enqueued its own work to run beside them. Returns (codes per piece, side stream or
        None). No host sync."""
        frames = [m.shape[-1] for m in mels]
        bucketed = self.use_cuda_graphs or self.bucket_eager
        out: list[torch.Tensor | None] = [None] * len(mels)
        jobs = []
        for group in self.model.group_pieces(frames, max_batch_frames, max_batch=GRAPH_BATCH if bucketed else None):
            longest = max(frames[i] for i in group)
            length = bucket_length(longest, MEL_UNIT, MEL_CAP, MEL_GEOMETRIC_AFTER) if bucketed else None
            jobs.append((group, length, bucket_batch(len(group)) if bucketed else None))
        side = self._side() if self.use_cuda_graphs else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for group, length, batch in jobs:
                mel, mel_len, padded = self.model.batch_mels([mels[i] for i in group], length, batch)
                if self.use_cuda_graphs:
                    with self.graphs.lock:
                        codes = self.graphs.run((batch, length, padded), (mel, mel_len)).clone()
                else:
                    codes = self._body((batch, length, padded), mel, mel_len)
                for j, i in enumerate(group):
                    out[i] = codes[j, : self.code_count(frames[i])]
        if side is not None and wait:
            torch.cuda.current_stream(self.device).wait_stream(side)
            side = None
        return out, side

    def warmup(self, max_frames: int, batch: int) -> None:
        """Capture the graphs of `batch`-piece batches of every length bucket up to `max_frames` mel
        frames (padded batches, the common case; and the unpadded full 30 s bucket). No-op without
        graphs."""
        if not self.use_cuda_graphs:
            return
        batch = bucket_batch(min(batch, GRAPH_BATCH))
        top = bucket_length(min(max_frames, MEL_CAP), MEL_UNIT, MEL_CAP, MEL_GEOMETRIC_AFTER)
        f = MEL_UNIT
        while True:
            with self.graphs.lock:
                self.graphs.entry((batch, f, True))
            if f >= top:
                break
            f = bucket_length(f + 1, MEL_UNIT, MEL_CAP, MEL_GEOMETRIC_AFTER)
        if max_frames >= MEL_CAP:               # whole 30 s pieces fill the last bucket exactly
            with self.graphs.lock:
                self.graphs.entry((batch, MEL_CAP, False))


# ---------------------------------------------------------------------------------- ONNX -> torch
_BLOCK_NODE = re.compile(r"^/blocks\.(\d+)/(attn/(query|key|value|out)|mlp/mlp\.(0|2)|attn_ln|mlp_ln)/"
                         r"(MatMul|Add|Add_1|Mul|LayerNormalization)$")
_NAMED = re.compile(r"^(?:encoders?\.)?(conv[12]\.(weight|bias)|positional_embedding|"
                    r"blocks\.\d+\.(attn_ln|mlp_ln)\.(weight|bias))$")
_ATTN_NODE = re.compile(r"^/blocks\.\d+/attn/")


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
        named = _NAMED.match(name)
        if named:
            tensors["encoder." + named.group(1)] = torch.from_numpy(array.copy())
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
        raise CheckpointError(f"{w.path}: initializers not part of the S3 v1 layout: " + "; ".join(unknown[:8]))
    conv1 = tensors.get("encoder.conv1.weight")
    pos = tensors.get("encoder.positional_embedding")
    if conv1 is None or pos is None:
        raise CheckpointError(f"{w.path}: no conv1 weight / positional_embedding initializer found")
    n_state, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    if codebook_candidates:
        codebook_candidates.sort(key=lambda t: (not t[0].endswith("_codebook/MatMul"), t[0]))
        _, _, cb = codebook_candidates[0]
        if cb.shape[0] == n_state and cb.shape[1] != n_state:
            cb = cb.T
        tensors["quantizer._codebook.embed"] = torch.from_numpy(np.array(cb, copy=True, order="C"))
    n_layer = 1 + max([int(k.split(".")[2]) for k in tensors if k.startswith("encoder.blocks.")], default=-1)
    stride = w.node_attributes.get("/conv1/Conv", {}).get("strides", [2])[0]
    if n_state % HEAD_DIM:
        raise CheckpointError(f"{w.path}: conv1 weight {tuple(conv1.shape)} gives n_state {n_state}, "
                              f"not a multiple of the S3 v1 head dim {HEAD_DIM}")
    n_head = n_state // HEAD_DIM
    _check_head_split(w, n_state, n_head)
    codebook = tensors.get("quantizer._codebook.embed")
    cfg = S3Config(n_mels=n_mels, n_ctx=int(pos.shape[0]), n_state=n_state, n_head=n_head, n_layer=n_layer,
                   codebook_size=int(codebook.shape[0]) if codebook is not None else 4096,
                   conv1_stride=int(stride))
    return cfg, tensors


def _int_values(array: np.ndarray) -> tuple[int, list[int | None]] | None:
    if array.dtype.kind not in "iu" or array.ndim > 1 or array.size > 16:
        return None
    return array.ndim, [int(v) for v in array.ravel()]


def _static_ints(w: OnnxWeights, name: str, depth: int = 0) -> tuple[int, list[int | None]] | None:
    """(rank, values) of a small integer tensor (a shape) folded from the graph's constants, with
    None for an entry known only at run time (a dimension read by Shape + Gather); None when even
    its length is not known statically. Reads the graph, runs nothing."""
    if depth > 32:
        return None
    if name in w.initializers:
        return _int_values(w.initializers[name])
    node = w.producers.get(name)
    if node is None:
        return None                                    # a graph input
    op, attrs = node.op_type, node.attributes
    if op == "Constant":
        for key in ("value", "value_ints", "value_int"):
            if key in attrs:
                return _int_values(np.asarray(attrs[key]))
        return None
    if op in ("Cast", "Identity"):
        return _static_ints(w, node.inputs[0], depth + 1)
    if op == "Unsqueeze":
        x = _static_ints(w, node.inputs[0], depth + 1)
        return (1, x[1]) if x is not None and x[0] == 0 else None
    if op == "Gather" and attrs.get("axis", 0) == 0 and len(node.inputs) == 2:
        idx = _static_ints(w, node.inputs[1], depth + 1)
        if idx is None or None in idx[1]:
            return None
        data = w.producers.get(node.inputs[0])
        if data is not None and data.op_type == "Shape":
            return idx[0], [None] * len(idx[1])        # dimensions of a run-time tensor
        src = _static_ints(w, node.inputs[0], depth + 1)
        if src is None or src[0] != 1 or not all(-len(src[1]) <= i < len(src[1]) for i in idx[1]):
            return None
        return idx[0], [src[1][i] for i in idx[1]]
    if op == "Concat":
        values: list[int | None] = []
        for part in node.inputs:
            v = _static_ints(w, part, depth + 1)
            if v is None:
                producer = w.producers.get(part)
                if producer is None or producer.op_type != "Unsqueeze":
                    return None
                v = (1, [None])        # a 1-D piece of a shape from Unsqueeze: one run-time scalar
            values += v[1]
        return 1, values
    return None


def _check_head_split(w: OnnxWeights, n_state: int, n_head: int) -> None:
    """Refuse a graph whose attention reshapes split heads other than v1's n_head x 64, wherever a
    rank-4 split (.., .., H, D) folds statically; -1, 0 and run-time entries say nothing."""
    for node in w.nodes:
        if node.op_type != "Reshape" or not _ATTN_NODE.match(node.name) or len(node.inputs) < 2:
            continue
        shape = _static_ints(w, node.inputs[1])
        if shape is None or shape[0] != 1 or len(shape[1]) != 4:
            continue
        h, dh = (v if v is not None and v > 0 else None for v in shape[1][2:])
        if (h is None or h == n_head) and (dh is None or dh == HEAD_DIM):
            continue
        h_txt = h if h is not None else f"{n_state // dh} (inferred)"
        dh_txt = dh if dh is not None else f"{n_state // h} (inferred)"
        raise CheckpointError(f"{w.path}: attention reshape {node.name} splits n_state {n_state} into "
                              f"{h_txt} heads x {dh_txt} dims (shape {shape[1]}); S3 v1 requires "
                              f"{n_head} heads x {HEAD_DIM} dims")


def _cache_metadata(onnx_path: str, cfg: S3Config) -> dict[str, str]:
    st = os.stat(onnx_path)
    meta = {k: str(v) for k, v in asdict(cfg).items()}
    meta.update(onnx_size=str(st.st_size), onnx_mtime_ns=str(st.st_mtime_ns))
    return meta


def _read_cache(onnx_path: str):
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
            if cfg.n_head * HEAD_DIM != cfg.n_state:
                return None            # written by a loader that took the head count from a graph constant
            return cfg, {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - a stale or broken cache is rebuilt, never trusted
        return None


def load_s3_tokenizer(onnx_path: str | os.PathLike, device="cpu", dtype=torch.float32,
                      cache: bool = True, kernels: KernelConfig = KernelConfig()) -> S3Tokenizer:
    """Build the native S3 tokenizer from the ONNX file's initializers (nothing is executed).
    With `cache`, the converted weights are kept beside it as `<file>.stepvox.safetensors`
    (checked against the ONNX file's size and mtime) when the folder is writable."""
    onnx_path = os.fspath(onnx_path)
    if not os.path.exists(onnx_path):
        raise CheckpointError(f"missing S3 tokenizer file {onnx_path}")
    cached = _read_cache(onnx_path) if cache else None
    if cached is not None:
        cfg, tensors = cached
    else:
        cfg, tensors = s3_tensors_from_onnx(read_onnx_weights(onnx_path))
    with torch.device("meta"):
        model = S3Tokenizer(cfg, kernels)
    load_strict(model, tensors, onnx_path)
    if cache and cached is None:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, onnx_path + CACHE_SUFFIX,
                      metadata=_cache_metadata(onnx_path, cfg))
        except OSError:
            pass                      # read-only model folder: convert again next time
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.quantizer._codebook.embed.data = model.quantizer._codebook.embed.data.float()   # search in fp32
    return model
