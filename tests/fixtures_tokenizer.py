"""Random Step-Audio tokenizer folders in the released formats (SPEC.md §1.1, §4, §5), for tests
and for bench/tokenizer.py (which imports this file for full-size random weights).

  <root>/dengcunqin/speech_paraformer-.../{config.yaml, am.mvn, model.pt}
  <root>/linguistic_tokenizer.npy
  <root>/speech_tokenizer_v1.onnx

model.pt is a plain dict of tensors saved with torch.save (encoder.* as SPEC §4.3 lists them,
plus a few decoder/predictor tensors that the loader must ignore). The ONNX file is a runnable
graph built with onnx.helper that computes the S3 v1 tokenizer from the SPEC §5 formulas, with
initializer names and consuming-node names laid out as in the released file, so onnxruntime can
serve as an independent implementation.

The second half holds independent eager implementations of the official Step-Audio path,
written from the SPEC formulas and the control flow of FunASR's online front end and streaming
encoder, on the raw fixture tensors (no stepvox code): tests compare stepvox against them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
import torchaudio
import torchaudio.compliance.kaldi as kaldi
from onnx import TensorProto, helper, numpy_helper

PARAFORMER_SUBDIR = "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"


@dataclass(frozen=True)
class TokenizerSizes:
    # Paraformer encoder
    p_model: int = 32
    p_heads: int = 2
    p_ffn: int = 48
    p_blocks: int = 3
    n_mels: int = 80          # the front end is fixed by the release: 80 mels x LFR 7 = 560
    vq02_codes: int = 64
    # S3 v1
    s_state: int = 64
    s_heads: int = 2
    s_layers: int = 2
    s_mels: int = 128
    s_ctx: int = 1500
    vq06_codes: int = 96


TINY = TokenizerSizes()
FULL = TokenizerSizes(p_model=512, p_heads=4, p_ffn=2048, p_blocks=50, vq02_codes=1024,
                      s_state=1280, s_heads=20, s_layers=6, vq06_codes=4096)


# ------------------------------------------------------------------------------------ Paraformer
def paraformer_tensors(sizes: TokenizerSizes, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, f, k = sizes.p_model, sizes.p_ffn, 11
    din = sizes.n_mels * 7

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f), torch.randn(out_f, generator=g) * 0.02

    sd = {}
    for name, size_in in [("encoders0.0", din)] + [(f"encoders.{i}", d) for i in range(sizes.p_blocks - 1)]:
        p = f"encoder.{name}"
        sd[f"{p}.norm1.weight"] = 1 + 0.1 * torch.randn(size_in, generator=g)
        sd[f"{p}.norm1.bias"] = 0.1 * torch.randn(size_in, generator=g)
        sd[f"{p}.self_attn.linear_q_k_v.weight"], sd[f"{p}.self_attn.linear_q_k_v.bias"] = lin(3 * d, size_in)
        sd[f"{p}.self_attn.linear_out.weight"], sd[f"{p}.self_attn.linear_out.bias"] = lin(d, d)
        sd[f"{p}.self_attn.fsmn_block.weight"] = 0.15 * torch.randn(d, 1, k, generator=g)
        sd[f"{p}.norm2.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        sd[f"{p}.norm2.bias"] = 0.1 * torch.randn(d, generator=g)
        sd[f"{p}.feed_forward.w_1.weight"], sd[f"{p}.feed_forward.w_1.bias"] = lin(f, d)
        sd[f"{p}.feed_forward.w_2.weight"], sd[f"{p}.feed_forward.w_2.bias"] = lin(d, f)
    sd["encoder.after_norm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    sd["encoder.after_norm.bias"] = 0.1 * torch.randn(d, generator=g)
    # parts of the full Paraformer that the tokenizer must ignore
    sd["decoder.decoders.0.self_attn.fsmn_block.weight"] = torch.randn(d, 1, k, generator=g)
    sd["decoder.output_layer.weight"] = torch.randn(17, d, generator=g)
    sd["predictor.cif_output.weight"] = torch.randn(1, d, generator=g)
    return sd


CONFIG_YAML = """\
model: ParaformerStreaming
model_conf:
    ctc_weight: 0.0
    predictor_bias: 1
encoder: SANMEncoderChunkOpt
encoder_conf:
    output_size: {d}
    attention_heads: {h}
    linear_units: {f}
    num_blocks: {n}
    dropout_rate: 0.1
    input_layer: pe_online
    pos_enc_class: SinusoidalPositionEncoder
    normalize_before: true
    kernel_size: 11
    sanm_shfit: 0
    selfattention_layer_type: sanm
    chunk_size: [12, 15]
    stride: [8, 10]
    pad_left: [0, 0]
    encoder_att_look_back_factor: [4, 4]
    decoder_att_look_back_factor: [1, 1]
decoder: ParaformerSANMDecoder
decoder_conf:
    attention_heads: {h}
    num_blocks: 1
predictor: CifPredictorV2
frontend: WavFrontendOnline
frontend_conf:
    fs: 16000
    window: hamming
    n_mels: {m}
    frame_length: 25
    frame_shift: 10
    lfr_m: 7
    lfr_n: 6
specaug: SpecAugLFR
normalize: null
"""


def cmvn_values(sizes: TokenizerSizes, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    dim = sizes.n_mels * 7
    return (-(11.0 + rng.normal(0, 1.5, dim))).astype(np.float32), rng.uniform(0.2, 0.4, dim).astype(np.float32)


def write_am_mvn(path: str, shift: np.ndarray, scale: np.ndarray) -> None:
    dim = shift.size
    fmt = " ".join
    with open(path, "w") as f:
        f.write("<Nnet>\n")
        f.write(f"<Splice> {dim} {dim}\n[ 0 ]\n")
        f.write(f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {fmt(f'{v:.6f}' for v in shift)} ]\n")
        f.write(f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {fmt(f'{v:.6f}' for v in scale)} ]\n")
        f.write("</Nnet>\n")


def write_paraformer_dir(folder: str, sizes: TokenizerSizes, seed: int) -> dict[str, torch.Tensor]:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(CONFIG_YAML.format(d=sizes.p_model, h=sizes.p_heads, f=sizes.p_ffn, n=sizes.p_blocks, m=sizes.n_mels))
    shift, scale = cmvn_values(sizes, seed)
    write_am_mvn(os.path.join(folder, "am.mvn"), shift, scale)
    sd = paraformer_tensors(sizes, seed)
    torch.save(sd, os.path.join(folder, "model.pt"))
    return sd


# ------------------------------------------------------------------------------------ S3 v1 ONNX
def sinusoids(length: int, channels: int) -> torch.Tensor:
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def s3_tensors(sizes: TokenizerSizes, seed: int) -> dict[str, torch.Tensor]:
    """Random S3 v1 weights under their torch names (S3Tokenizer's naming)."""
    g = torch.Generator().manual_seed(seed + 7)
    d = sizes.s_state

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "encoder.conv1.weight": rnd(d, sizes.s_mels, 3, scale=1 / math.sqrt(3 * sizes.s_mels)),
        "encoder.conv1.bias": rnd(d, scale=0.02),
        "encoder.conv2.weight": rnd(d, d, 3, scale=1 / math.sqrt(3 * d)),
        "encoder.conv2.bias": rnd(d, scale=0.02),
        "encoder.positional_embedding": sinusoids(sizes.s_ctx, d),
    }
    for i in range(sizes.s_layers):
        p = f"encoder.blocks.{i}"
        for ln in ("attn_ln", "mlp_ln"):
            sd[f"{p}.{ln}.weight"] = 1 + rnd(d, scale=0.1)
            sd[f"{p}.{ln}.bias"] = rnd(d, scale=0.1)
        for name in ("query", "key", "value", "out"):
            sd[f"{p}.attn.{name}.weight"] = rnd(d, d, scale=1 / math.sqrt(d))
            if name != "key":
                sd[f"{p}.attn.{name}.bias"] = rnd(d, scale=0.02)
        sd[f"{p}.mlp.0.weight"] = rnd(4 * d, d, scale=1 / math.sqrt(d))
        sd[f"{p}.mlp.0.bias"] = rnd(4 * d, scale=0.02)
        sd[f"{p}.mlp.2.weight"] = rnd(d, 4 * d, scale=1 / math.sqrt(4 * d))
        sd[f"{p}.mlp.2.bias"] = rnd(d, scale=0.02)
    sd["quantizer._codebook.embed"] = rnd(sizes.vq06_codes, d, scale=1 / math.sqrt(d))
    return sd


class _Graph:
    def __init__(self):
        self.nodes, self.inits, self.anon = [], [], 0

    def init(self, array, name=None) -> str:
        if name is None:
            self.anon += 1
            name = f"onnx::MatMul_{1000 + self.anon}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, scope, value, dtype=np.float32) -> str:
        out = f"{scope}/Constant_{len(self.nodes)}_output_0"
        arr = np.asarray(value, dtype=dtype)
        self.nodes.append(helper.make_node("Constant", [], [out], name=f"{scope}/Constant_{len(self.nodes)}",
                                           value=numpy_helper.from_array(arr)))
        return out

    def op(self, op_type, inputs, name, **attrs) -> str:
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def gelu(self, x, scope):
        t = self.op("Div", [x, self.const(scope, math.sqrt(2.0))], f"{scope}/Div")
        t = self.op("Erf", [t], f"{scope}/Erf")
        t = self.op("Add", [t, self.const(scope, 1.0)], f"{scope}/Add")
        t = self.op("Mul", [x, t], f"{scope}/Mul")
        return self.op("Mul", [t, self.const(scope, 0.5)], f"{scope}/Mul_1")

    def layer_norm(self, x, scope, weight, bias, fused, weight_name=None, bias_name=None):
        if fused:
            return self.op("LayerNormalization", [x, self.init(weight, weight_name), self.init(bias, bias_name)],
                           f"{scope}/LayerNormalization", axis=-1, epsilon=1e-5)
        mean = self.op("ReduceMean", [x], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
        cen = self.op("Sub", [x, mean], f"{scope}/Sub")
        sq = self.op("Pow", [cen, self.const(scope, 2.0)], f"{scope}/Pow")
        var = self.op("ReduceMean", [sq], f"{scope}/ReduceMean_1", axes=[-1], keepdims=1)
        var = self.op("Add", [var, self.const(scope, 1e-5)], f"{scope}/Add")
        std = self.op("Sqrt", [var], f"{scope}/Sqrt")
        y = self.op("Div", [cen, std], f"{scope}/Div")
        y = self.op("Mul", [y, self.init(weight)], f"{scope}/Mul")
        return self.op("Add", [y, self.init(bias)], f"{scope}/Add_1")

    def linear(self, x, scope, weight, bias):
        y = self.op("MatMul", [x, self.init(weight.T)], f"{scope}/MatMul")      # ONNX keeps (in, out)
        return y if bias is None else self.op("Add", [self.init(bias), y], f"{scope}/Add")


def build_s3_onnx(path: str, sd: dict[str, torch.Tensor], n_heads: int, conv1_stride: int = 2,
                  fused_layer_norm: bool = True) -> None:
    """Write a runnable S3 v1 graph with the released layout of names (see module docstring)."""
    a = {k: v.detach().float().numpy() for k, v in sd.items()}
    d = a["encoder.conv1.weight"].shape[0]
    n_layers = 1 + max(int(k.split(".")[2]) for k in a if k.startswith("encoder.blocks."))
    dh = d // n_heads
    g = _Graph()
    x = g.op("Conv", ["feats", g.init(a["encoder.conv1.weight"], "encoders.conv1.weight"),
                      g.init(a["encoder.conv1.bias"], "encoders.conv1.bias")], "/conv1/Conv",
             kernel_shape=[3], pads=[1, 1], strides=[conv1_stride])
    x = g.gelu(x, "/gelu")
    x = g.op("Conv", [x, g.init(a["encoder.conv2.weight"], "encoders.conv2.weight"),
                      g.init(a["encoder.conv2.bias"], "encoders.conv2.bias")], "/conv2/Conv",
             kernel_shape=[3], pads=[1, 1], strides=[2])
    x = g.gelu(x, "/gelu_1")
    x = g.op("Transpose", [x], "/Transpose", perm=[0, 2, 1])
    shape = g.op("Shape", [x], "/Shape")
    t_len = g.op("Gather", [shape, g.const("", [1], np.int64)], "/Gather", axis=0)
    pos = g.op("Slice", [g.init(a["encoder.positional_embedding"], "encoders.positional_embedding"),
                         g.const("", [0], np.int64), t_len, g.const("", [0], np.int64)], "/Slice")
    x = g.op("Add", [x, pos], "/Add")
    scale = dh ** -0.25
    for i in range(n_layers):
        p, s = f"encoder.blocks.{i}", f"/blocks.{i}"
        y = g.layer_norm(x, f"{s}/attn_ln", a[f"{p}.attn_ln.weight"], a[f"{p}.attn_ln.bias"], fused_layer_norm,
                         f"encoders.blocks.{i}.attn_ln.weight", f"encoders.blocks.{i}.attn_ln.bias")
        q = g.linear(y, f"{s}/attn/query", a[f"{p}.attn.query.weight"], a[f"{p}.attn.query.bias"])
        k = g.linear(y, f"{s}/attn/key", a[f"{p}.attn.key.weight"], None)
        v = g.linear(y, f"{s}/attn/value", a[f"{p}.attn.value.weight"], a[f"{p}.attn.value.bias"])
        heads = g.op("Constant", [], f"{s}/attn/Constant_1", value=numpy_helper.from_array(np.array(n_heads, np.int64)))
        heads_1d = g.op("Unsqueeze", [heads, g.const(f"{s}/attn", [0], np.int64)], f"{s}/attn/Unsqueeze")
        split_shape = g.op("Concat", [g.const(f"{s}/attn", [0, -1], np.int64), heads_1d,
                                      g.const(f"{s}/attn", [dh], np.int64)], f"{s}/attn/Concat", axis=0)
        qh = g.op("Reshape", [q, split_shape], f"{s}/attn/Reshape")
        qh = g.op("Transpose", [qh], f"{s}/attn/Transpose", perm=[0, 2, 1, 3])
        qh = g.op("Mul", [qh, g.const(f"{s}/attn", scale)], f"{s}/attn/Mul")
        kh = g.op("Reshape", [k, split_shape], f"{s}/attn/Reshape_1")
        kh = g.op("Transpose", [kh], f"{s}/attn/Transpose_1", perm=[0, 2, 3, 1])
        kh = g.op("Mul", [kh, g.const(f"{s}/attn", scale)], f"{s}/attn/Mul_1")
        vh = g.op("Reshape", [v, split_shape], f"{s}/attn/Reshape_2")
        vh = g.op("Transpose", [vh], f"{s}/attn/Transpose_2", perm=[0, 2, 1, 3])
        w = g.op("Softmax", [g.op("MatMul", [qh, kh], f"{s}/attn/MatMul")], f"{s}/attn/Softmax", axis=-1)
        o = g.op("MatMul", [w, vh], f"{s}/attn/MatMul_1")
        o = g.op("Transpose", [o], f"{s}/attn/Transpose_3", perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, g.const(f"{s}/attn", [0, -1, d], np.int64)], f"{s}/attn/Reshape_3")
        o = g.linear(o, f"{s}/attn/out", a[f"{p}.attn.out.weight"], a[f"{p}.attn.out.bias"])
        x = g.op("Add", [x, o], f"{s}/Add")
        y = g.layer_norm(x, f"{s}/mlp_ln", a[f"{p}.mlp_ln.weight"], a[f"{p}.mlp_ln.bias"], fused_layer_norm,
                         f"encoders.blocks.{i}.mlp_ln.weight", f"encoders.blocks.{i}.mlp_ln.bias")
        y = g.linear(y, f"{s}/mlp/mlp.0", a[f"{p}.mlp.0.weight"], a[f"{p}.mlp.0.bias"])
        y = g.gelu(y, f"{s}/mlp/mlp.1")
        y = g.linear(y, f"{s}/mlp/mlp.2", a[f"{p}.mlp.2.weight"], a[f"{p}.mlp.2.bias"])
        x = g.op("Add", [x, y], f"{s}/Add_1")
    norm = g.op("ReduceL2", [x], "/ReduceL2", axes=[-1], keepdims=1)
    norm = g.op("Max", [norm, g.const("", 1e-12)], "/Max")
    x = g.op("Div", [x, norm], "/Div")
    q = "/quantizer/rq/model/layers.0/_codebook"
    cb = g.init(a["quantizer._codebook.embed"].T)                                   # stored [D, K]
    xe = g.op("MatMul", [x, cb], f"{q}/MatMul")
    xsq = g.op("ReduceSum", [g.op("Pow", [x, g.const(q, 2.0)], f"{q}/Pow"), g.const(q, [-1], np.int64)],
               f"{q}/ReduceSum", keepdims=1)
    esq = g.op("ReduceSum", [g.op("Pow", [cb, g.const(q, 2.0)], f"{q}/Pow_1"), g.const(q, [0], np.int64)],
               f"{q}/ReduceSum_1", keepdims=1)
    dist = g.op("Add", [g.op("Sub", [xsq, g.op("Mul", [xe, g.const(q, 2.0)], f"{q}/Mul")], f"{q}/Sub"), esq],
                f"{q}/Add")
    codes = g.op("ArgMax", [g.op("Neg", [dist], f"{q}/Neg")], f"{q}/ArgMax", axis=-1, keepdims=0)
    graph = helper.make_graph(
        g.nodes, "speech_tokenizer_v1",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", a["encoder.conv1.weight"].shape[1], "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, ["B"])],
        [helper.make_tensor_value_info(codes, TensorProto.INT64, ["B", "T_out"])], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


# ------------------------------------------------------------------------------------ whole folder
def write_tokenizer_dir(root: str, sizes: TokenizerSizes = TINY, seed: int = 0,
                        fused_layer_norm: bool = True, vq02_codebook: np.ndarray | None = None) -> dict:
    """Write a complete random tokenizer folder; returns the tensors written, for references."""
    os.makedirs(root, exist_ok=True)
    para = write_paraformer_dir(os.path.join(root, PARAFORMER_SUBDIR), sizes, seed)
    rng = np.random.default_rng(seed + 3)
    if vq02_codebook is None:
        vq02_codebook = rng.normal(0, 1, (sizes.vq02_codes, sizes.p_model)).astype(np.float32)
    np.save(os.path.join(root, "linguistic_tokenizer.npy"), vq02_codebook)
    s3 = s3_tensors(sizes, seed)
    build_s3_onnx(os.path.join(root, "speech_tokenizer_v1.onnx"), s3, sizes.s_heads,
                  fused_layer_norm=fused_layer_norm)
    shift, scale = cmvn_values(sizes, seed)
    return {"paraformer": para, "s3": s3, "vq02_codebook": vq02_codebook, "cmvn": (shift, scale)}


def espeak_wav(path_dir: str, text: str, name: str = "speech") -> tuple[np.ndarray, int]:
    """Real speech from espeak-ng (22.05 kHz mono int16 WAV); returns (float32 samples, rate)."""
    import subprocess
    import wave
    path = os.path.join(path_dir, f"{name}.wav")
    subprocess.run(["espeak-ng", "-w", path, text], check=True, capture_output=True)
    with wave.open(path, "rb") as f:
        rate = f.getframerate()
        data = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)
    return data.astype(np.float32) / 32768.0, rate


# ======================================================================================== independent references
CHUNK = 3840


# ------------------------------------------------------------------ the online front end, replayed step by step (written anew)
class OfficialFrontend:
    def __init__(self, shift: np.ndarray, scale: np.ndarray):
        self.shift, self.scale = torch.from_numpy(shift), torch.from_numpy(scale)
        self.input_cache = torch.zeros(0)
        self.splice = None

    def _lfr(self, inputs, final):
        t = inputs.shape[0]
        t_lfr = int(np.ceil((t - 3) / 6))
        rows, splice_idx = [], t_lfr
        for i in range(t_lfr):
            if 7 <= t - i * 6:
                rows.append(inputs[i * 6:i * 6 + 7].reshape(1, -1))
            elif final:
                frame = inputs[i * 6:].reshape(-1)
                for _ in range(7 - (t - i * 6)):
                    frame = torch.cat([frame, inputs[-1]])
                rows.append(frame[None])
            else:
                splice_idx = i
                break
        self.splice = inputs[min(t - 1, splice_idx * 6):]
        out = torch.vstack(rows)                      # raises when nothing was produced, as FunASR does
        return (out + self.shift) * self.scale

    def __call__(self, piece, final):
        audio = torch.cat([self.input_cache, piece])
        n = int((audio.numel() - 400) / 160 + 1)
        n = n if n >= 1 and audio.numel() >= 400 else 0
        self.input_cache = audio[-(audio.numel() - n * 160):]
        if n:
            feats = kaldi.fbank(audio[None] * 32768, num_mel_bins=80, frame_length=25, frame_shift=10,
                                dither=0.0, energy_floor=0.0, window_type="hamming", sample_frequency=16000)
            if self.splice is None:
                self.splice = feats[:1].repeat(3, 1)
            if feats.shape[0] + self.splice.shape[0] >= 7:
                return self._lfr(torch.cat([self.splice, feats]), final)
            self.splice = torch.cat([self.splice, feats])
            return torch.zeros(0, 560)
        if final:
            if self.splice is None:
                raise RuntimeError("empty splice cache")
            return self._lfr(self.splice, final)
        return torch.zeros(0, 560)


def official_feature_calls(wav16k: torch.Tensor, shift, scale) -> list[torch.Tensor]:
    """`infer_encoder`'s loop over 3840-sample calls of a whole file (is_final on the last)."""
    fe = OfficialFrontend(shift, scale)
    n = wav16k.numel() // CHUNK + 1
    calls = []
    for i in range(n):
        final = i == n - 1
        piece = wav16k[i * CHUNK:(i + 1) * CHUNK]
        if final and piece.numel() == 0:
            break
        try:
            rows = fe(piece, final)
        except RuntimeError:
            if final and piece.numel() < 480:
                break
            raise
        if rows.shape[0] == 0:
            assert final, "a non-final call produced no rows"
            break
        calls.append(rows)
    return calls


# ------------------------------------------------------------------ the chunked SAN-M encoder, replayed step by step (written anew)
def _ln(x, sd, p):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], 1e-12)


def official_encoder(calls: list[torch.Tensor], sd: dict, heads: int, d_model: int) -> torch.Tensor:
    names = ["encoder.encoders0.0"] + sorted(
        {".".join(k.split(".")[:3]) for k in sd if k.startswith("encoder.encoders.")}, key=lambda s: int(s.split(".")[2]))
    cache_feats = torch.zeros(1, 5, calls[0].shape[1]) if calls else None
    caches = [None] * len(names)
    start = 0
    outs = []
    dk = d_model // heads
    for x in calls:
        t = x.shape[0]
        x = x[None] * d_model ** 0.5
        depth = x.shape[-1]
        pos = torch.arange(1, t + start + 1)[None].float()
        inc = torch.log(torch.tensor([10000.0])) / (depth / 2 - 1)
        inv = torch.exp(torch.arange(depth / 2).float() * -inc).reshape(1, -1)
        st = pos.reshape(1, -1, 1) * inv.reshape(1, 1, -1)
        pe = torch.cat([torch.sin(st), torch.cos(st)], dim=2)
        x = x + pe[:, start:start + t]
        start += t
        h = torch.cat([cache_feats, x], dim=1)
        cache_feats = h[:, -5:]
        for li, p in enumerate(names):
            residual = h
            y = _ln(h, sd, p + ".norm1")
            qkv = F.linear(y, sd[p + ".self_attn.linear_q_k_v.weight"], sd[p + ".self_attn.linear_q_k_v.bias"])
            q, k, v = torch.split(qkv, d_model, dim=-1)
            b, n, _ = q.shape
            q_h, k_h, v_h = (z.reshape(b, n, heads, dk).transpose(1, 2) for z in (q, k, v))
            if caches[li] is None:
                caches[li] = {"k": k_h[:, :, :-5], "v": v_h[:, :, :-5]}
            else:
                ks, vs = k_h[:, :, :-5], v_h[:, :, :-5]
                k_h = torch.cat([caches[li]["k"], k_h], dim=2)
                v_h = torch.cat([caches[li]["v"], v_h], dim=2)
                caches[li]["k"] = torch.cat([caches[li]["k"], ks], dim=2)[:, :, -16:]
                caches[li]["v"] = torch.cat([caches[li]["v"], vs], dim=2)[:, :, -16:]
            mem = F.conv1d(F.pad(v.transpose(1, 2), (5, 5)), sd[p + ".self_attn.fsmn_block.weight"],
                           groups=d_model).transpose(1, 2) + v
            att = torch.softmax((q_h * dk ** -0.5) @ k_h.transpose(-2, -1), dim=-1) @ v_h
            att = att.transpose(1, 2).reshape(b, n, d_model)
            att = F.linear(att, sd[p + ".self_attn.linear_out.weight"], sd[p + ".self_attn.linear_out.bias"]) + mem
            h = residual + att if residual.shape[-1] == d_model else att
            y = _ln(h, sd, p + ".norm2")
            y = F.linear(F.relu(F.linear(y, sd[p + ".feed_forward.w_1.weight"], sd[p + ".feed_forward.w_1.bias"])),
                         sd[p + ".feed_forward.w_2.weight"], sd[p + ".feed_forward.w_2.bias"])
            h = h + y
        h = _ln(h, sd, "encoder.after_norm")
        outs.append(h[0, -t:])
    return torch.cat(outs) if outs else torch.zeros(0, d_model)


def kmeans_codes(x: torch.Tensor, codebook: np.ndarray) -> list[int]:
    if x.shape[0] == 0:
        return []
    return torch.cdist(x, torch.from_numpy(codebook)).argmin(dim=1).tolist()


# ------------------------------------------------------------------ Whisper log-mel with a librosa-style mel matrix
def slaney_mel_matrix(sr=16000, n_fft=400, n_mels=128) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels) (Slaney scale, Slaney norm), in float64."""
    def hz_to_mel(f):
        f = np.asanyarray(f, dtype=np.float64)
        mel = f / (200.0 / 3)
        log_region = f >= 1000.0
        return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)

    def mel_to_hz(m):
        m = np.asanyarray(m, dtype=np.float64)
        f = m * (200.0 / 3)
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), f)

    fftfreqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def whisper_log_mel_reference(wav: torch.Tensor, n_mels=128) -> torch.Tensor:
    stft = torch.stft(wav, 400, 160, window=torch.hann_window(400), return_complex=True)
    mag = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(slaney_mel_matrix(n_mels=n_mels)) @ mag
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# ------------------------------------------------------------------ S3 v1, eager (S3Tokenizer-style formulas)
def s3_codes_reference(mel: torch.Tensor, sd: dict, heads: int, stride: int = 2) -> list[int]:
    x = F.gelu(F.conv1d(mel[None], sd["encoder.conv1.weight"], sd["encoder.conv1.bias"], stride=stride, padding=1))
    x = F.gelu(F.conv1d(x, sd["encoder.conv2.weight"], sd["encoder.conv2.bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1)
    x = x + sd["encoder.positional_embedding"][: x.shape[1]]
    d = x.shape[-1]
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    scale = (d // heads) ** -0.25
    for i in range(n_layers):
        p = f"encoder.blocks.{i}"
        y = F.layer_norm(x, (d,), sd[f"{p}.attn_ln.weight"], sd[f"{p}.attn_ln.bias"], 1e-5)
        q = F.linear(y, sd[f"{p}.attn.query.weight"], sd[f"{p}.attn.query.bias"])
        k = F.linear(y, sd[f"{p}.attn.key.weight"])
        v = F.linear(y, sd[f"{p}.attn.value.weight"], sd[f"{p}.attn.value.bias"])
        q = q.view(1, -1, heads, d // heads).permute(0, 2, 1, 3) * scale
        k = k.view(1, -1, heads, d // heads).permute(0, 2, 3, 1) * scale
        v = v.view(1, -1, heads, d // heads).permute(0, 2, 1, 3)
        w = torch.softmax((q @ k).float(), dim=-1)
        a = (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)
        x = x + F.linear(a, sd[f"{p}.attn.out.weight"], sd[f"{p}.attn.out.bias"])
        y = F.layer_norm(x, (d,), sd[f"{p}.mlp_ln.weight"], sd[f"{p}.mlp_ln.bias"], 1e-5)
        x = x + F.linear(F.gelu(F.linear(y, sd[f"{p}.mlp.0.weight"], sd[f"{p}.mlp.0.bias"])),
                         sd[f"{p}.mlp.2.weight"], sd[f"{p}.mlp.2.bias"])
    x = F.normalize(x[0].float(), p=2, dim=-1)
    e = sd["quantizer._codebook.embed"].t()
    dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ e + e.pow(2).sum(0, keepdim=True))
    return dist.max(dim=-1).indices.tolist()


# ------------------------------------------------------------------ the whole official wav2token
def official_wav2token(wav: np.ndarray, sr: int, fixture: dict, sizes, energy_norm=True) -> tuple[list, list, list]:
    audio = torch.from_numpy(np.asarray(wav, dtype=np.float32))[None]
    if sr != 16000:
        audio = torchaudio.transforms.Resample(orig_freq=sr, new_freq=16000)(audio)
    if energy_norm:
        audio = audio / max(torch.max(torch.abs(audio)), 0.01) * 0.999
    audio = audio[0]
    shift, scale = fixture["cmvn"]
    enc = official_encoder(official_feature_calls(audio, shift, scale), fixture["paraformer"],
                           sizes.p_heads, sizes.p_model)
    vq02 = kmeans_codes(enc, fixture["vq02_codebook"])
    vq06 = []
    for start in range(0, audio.numel(), 480000):
        piece = audio[start:start + 480000]
        if piece.numel() < 480:
            continue
        vq06 += s3_codes_reference(whisper_log_mel_reference(piece), fixture["s3"], sizes.s_heads)
    groups = min(len(vq06) // 3, len(vq02) // 2)
    ids = []
    for g in range(groups):
        ids += [c + 65536 for c in vq02[2 * g:2 * g + 2]] + [c + 66560 for c in vq06[3 * g:3 * g + 3]]
    return vq02, vq06, ids


def approx_equal_codes(a: list[int], b: list[int], max_mismatch: float = 0.0) -> bool:
    if len(a) != len(b):
        return False
    if not a:
        return True
    return np.mean(np.asarray(a) != np.asarray(b)) <= max_mismatch
