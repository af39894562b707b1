"""Random Step-Audio-Tokenizer folders in the released formats (SPEC.md §1.1, §4, §5), tiny (tests,
the CLI's default) or of the released sizes (benchmarks).

  <root>/dengcunqin/speech_paraformer-.../{config.yaml, am.mvn, model.pt, tokens.json}
  <root>/linguistic_tokenizer.npy
  <root>/speech_tokenizer_v1.onnx

model.pt is a plain dict of tensors saved with torch.save: encoder.* as SPEC §4.3 lists them, then
the recognizer the tokenizer ignores and the transcriber loads, under FunASR's names:
predictor.* (CifPredictorV2) and decoder.* (ParaformerSANMDecoder, embed.0 included). tokens.json
is the decoder's vocabulary, specials where FunASR puts them (0 <blank>, 1 <s>, 2 </s>, last <unk>).
The ONNX file is a runnable graph built with onnx.helper that computes the S3 v1 tokenizer from the SPEC §5 formulas, with
initializer names and consuming-node names laid out as in the released file, so onnxruntime can
serve as an independent implementation.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from stepvox.engine.models.paraformer import PARAFORMER_SUBDIR


@dataclass(frozen=True)
class TokenizerSizes:
    # Paraformer encoder
    p_model: int = 32
    p_heads: int = 2
    p_ffn: int = 48
    p_blocks: int = 3
    n_mels: int = 80          # the front end is fixed by the release: 80 mels x LFR 7 = 560
    vq02_codes: int = 64
    # Paraformer recognizer (decoder attention dim and heads are the encoder's p_model, p_heads)
    d_blocks: int = 2
    d_ffn: int = 40
    vocab: int = 48
    # S3 v1 (head dim 64, as the loader requires: s_state = 64 * s_heads)
    s_state: int = 128
    s_heads: int = 2
    s_layers: int = 2
    s_mels: int = 128
    s_ctx: int = 1500
    vq06_codes: int = 96


TINY = TokenizerSizes()
# Released sizes. Recognizer [derived]: template.yaml's decoder_conf (16 blocks, 4 heads, linear_units
# 2048, kernel 11, sanm_shfit 5) and predictor_conf (idim 512, l_order = r_order = 1); vocab 8501 from
# the folder name; attention dim = encoder output_size 512. Cross-check: these tensors plus the
# encoder's are 220,183,958 float32 values = 880.7 MB, the 881 MB SPEC §1.1 gives for model.pt (so
# decoder.embed.0 is there and no ctc.* is).
FULL = TokenizerSizes(p_model=512, p_heads=4, p_ffn=2048, p_blocks=50, vq02_codes=1024,
                      s_state=1280, s_heads=20, s_layers=6, vq06_codes=4096, d_blocks=16, d_ffn=2048, vocab=8501)

SPECIAL_TOKENS = ("<blank>", "<s>", "</s>")     # ids 0, 1, 2; "<unk>" is the last id
TINY_WORDS = ("你", "好", "我", "们", "是", "的", "中", "国", "人", "说", "广", "东", "话", "㗎",
              "1", "2", "0",
              "hello", "world", "the", "yes", "it's", "hel@@", "wor@@", "speak@@", "ing", "s", "ed",
              "a", "b", "c", "i", "x", "'", "-", "ok@@", "ay", "good", "morning", "是@@")


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
    sd.update(recognizer_tensors(sizes, seed))      # its own generator: the encoder's bytes stay as they were
    return sd


def recognizer_shapes(sizes: TokenizerSizes) -> dict[str, tuple[int, ...]]:
    """model.pt names and shapes of CifPredictorV2 and ParaformerSANMDecoder (FunASR's module tree)."""
    d, f, v, k = sizes.p_model, sizes.d_ffn, sizes.vocab, 11
    shapes = {"predictor.cif_conv1d.weight": (d, d, 3), "predictor.cif_conv1d.bias": (d,),
              "predictor.cif_output.weight": (1, d), "predictor.cif_output.bias": (1,),
              "decoder.embed.0.weight": (v, d)}

    def ffn(p):
        shapes.update({f"{p}.feed_forward.w_1.weight": (f, d), f"{p}.feed_forward.w_1.bias": (f,),
                       f"{p}.feed_forward.w_2.weight": (d, f), f"{p}.feed_forward.norm.weight": (f,),
                       f"{p}.feed_forward.norm.bias": (f,), f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,)})

    for i in range(sizes.d_blocks):
        p = f"decoder.decoders.{i}"
        ffn(p)
        shapes.update({f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,), f"{p}.norm3.weight": (d,),
                       f"{p}.norm3.bias": (d,), f"{p}.self_attn.fsmn_block.weight": (d, 1, k),
                       f"{p}.src_attn.linear_q.weight": (d, d), f"{p}.src_attn.linear_q.bias": (d,),
                       f"{p}.src_attn.linear_k_v.weight": (2 * d, d), f"{p}.src_attn.linear_k_v.bias": (2 * d,),
                       f"{p}.src_attn.linear_out.weight": (d, d), f"{p}.src_attn.linear_out.bias": (d,)})
    ffn("decoder.decoders3.0")
    shapes.update({"decoder.after_norm.weight": (d,), "decoder.after_norm.bias": (d,),
                   "decoder.output_layer.weight": (v, d), "decoder.output_layer.bias": (v,)})
    return shapes


def recognizer_tensors(sizes: TokenizerSizes, seed: int) -> dict[str, torch.Tensor]:
    """Random recognizer weights, scaled so that CIF fires a few tokens per second of speech and the
    decoder's argmax wanders over the whole vocabulary."""
    g = torch.Generator().manual_seed(seed + 11)
    sd = {}
    for name, shape in recognizer_shapes(sizes).items():
        if name == "predictor.cif_output.bias":
            sd[name] = torch.full(shape, -0.6)
        elif name.endswith(".bias"):
            norm = ".norm" in name or "after_norm" in name
            sd[name] = (0.1 if norm else 0.02) * torch.randn(shape, generator=g)
        elif "norm" in name.rsplit(".", 2)[-2]:
            sd[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("fsmn_block.weight"):
            sd[name] = 0.15 * torch.randn(shape, generator=g)
        elif name == "decoder.output_layer.weight":
            sd[name] = 2.0 * torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            fan_in = math.prod(shape[1:])
            sd[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


def vocabulary(sizes: TokenizerSizes) -> list[str]:
    """tokens.json: specials at FunASR's places, then words (the tiny list, or CJK characters up to the size)."""
    body = list(TINY_WORDS)
    fill = sizes.vocab - len(SPECIAL_TOKENS) - 1
    if fill < len(body):
        body = body[:fill]
    body += [chr(0x4E00 + i) for i in range(fill - len(body))]
    return list(SPECIAL_TOKENS) + body + ["<unk>"]


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


# the recognizer's part of config.yaml (template.yaml's values; sizes filled in)
RECOGNIZER_YAML = """\
decoder: ParaformerSANMDecoder
decoder_conf:
    attention_heads: {h}
    linear_units: {f}
    num_blocks: {n}
    dropout_rate: 0.1
    positional_dropout_rate: 0.1
    self_attention_dropout_rate: 0.1
    src_attention_dropout_rate: 0.1
    att_layer_num: {n}
    kernel_size: 11
    sanm_shfit: 5
predictor: CifPredictorV2
predictor_conf:
    idim: {d}
    threshold: 1.0
    l_order: 1
    r_order: 1
    tail_threshold: 0.45
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
        f.write(RECOGNIZER_YAML.format(d=sizes.p_model, h=sizes.p_heads, f=sizes.d_ffn, n=sizes.d_blocks))
    shift, scale = cmvn_values(sizes, seed)
    write_am_mvn(os.path.join(folder, "am.mvn"), shift, scale)
    sd = paraformer_tensors(sizes, seed)
    torch.save(sd, os.path.join(folder, "model.pt"))
    with open(os.path.join(folder, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(vocabulary(sizes), f)            # ASCII with \u escapes, as FunASR writes it
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
        # the released graph's split (0, -1, heads, dh) states its head count in this Constant_1
        # (a torch.onnx.export has a Gather index there): the loader checks the split, not the name
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
    return {"paraformer": para, "s3": s3, "vq02_codebook": vq02_codebook, "cmvn": (shift, scale),
            "tokens": vocabulary(sizes)}
