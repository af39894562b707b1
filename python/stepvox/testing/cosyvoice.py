"""Random CosyVoice-300M-25Hz folders (the speech decoder) in the released formats, built from SPEC.md.

The key/shape layouts here are written out from SPEC.md §3.3 (flow.pt) and §3.4 (hift.pt) with the
yaml values as parameters, independently of the engine's modules, and are used both to write tiny
random checkpoints and to check the engine's full-size layout on the meta device.
"""
from __future__ import annotations

import math
import os

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from stepvox.engine.audio.decoder import SpeakerPrompt

FULL_YAML = """\
__set_seed1: !apply:random.seed [1986]
sample_rate: 22050
spk_embed_dim: 192
flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {in_dim}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 5120
    input_frame_rate: 41.667
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: {enc_dim}
        attention_heads: {enc_heads}
        linear_units: {enc_units}
        num_blocks: {enc_blocks}
        dropout_rate: 0.01
        positional_dropout_rate: 0.01
        attention_dropout_rate: 0.01
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {in_dim}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{est_ch}, {est_ch}]
            dropout: 0
            attention_head_dim: {head_dim}
            n_blocks: {n_blocks}
            num_mid_blocks: {mid_blocks}
            num_heads: {heads}
            act_fn: 'gelu'
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_ch}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_ch}
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1024
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 256
    win_size: 1024
    fmin: 0
    fmax: 8000
    center: False
"""

FULL_SIZES = dict(in_dim=512, enc_dim=512, enc_heads=8, enc_units=2048, enc_blocks=6, est_ch=256, head_dim=64, n_blocks=4,
                  mid_blocks=12, heads=8, hift_ch=512, f0_ch=512)
TINY_SIZES = dict(in_dim=16, enc_dim=32, enc_heads=2, enc_units=48, enc_blocks=2, est_ch=32, head_dim=8, n_blocks=1,
                  mid_blocks=2, heads=2, hift_ch=32, f0_ch=16)


def yaml_text(sizes: dict = TINY_SIZES) -> str:
    return FULL_YAML.format(**sizes)


# ----------------------------------------------------------------------------- layouts from SPEC
def spec_flow_layout(s: dict) -> dict[str, tuple]:
    """flow.pt keys and shapes, SPEC.md §3.3, for the sizes in `s`."""
    L: dict[str, tuple] = {}
    d, h, u = s["enc_dim"], s["enc_heads"], s["enc_units"]
    L["input_embedding.weight"] = (5120, s["in_dim"])
    L["spk_embed_affine_layer.weight"], L["spk_embed_affine_layer.bias"] = (80, 192), (80,)
    L["encoder.embed.out.0.weight"], L["encoder.embed.out.0.bias"] = (d, s["in_dim"]), (d,)
    L["encoder.embed.out.1.weight"], L["encoder.embed.out.1.bias"] = (d,), (d,)
    for i in range(s["enc_blocks"]):
        p = f"encoder.encoders.{i}."
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            L[p + f"self_attn.{lin}.weight"], L[p + f"self_attn.{lin}.bias"] = (d, d), (d,)
        L[p + "self_attn.linear_pos.weight"] = (d, d)
        L[p + "self_attn.pos_bias_u"] = L[p + "self_attn.pos_bias_v"] = (h, d // h)
        L[p + "feed_forward.w_1.weight"], L[p + "feed_forward.w_1.bias"] = (u, d), (u,)
        L[p + "feed_forward.w_2.weight"], L[p + "feed_forward.w_2.bias"] = (d, u), (d,)
        for n in ("norm_mha", "norm_ff"):
            L[p + f"{n}.weight"] = L[p + f"{n}.bias"] = (d,)
    L["encoder.after_norm.weight"] = L["encoder.after_norm.bias"] = (d,)
    L["encoder_proj.weight"], L["encoder_proj.bias"] = (80, d), (80,)
    for i in (0, 3, 6, 9):
        L[f"length_regulator.model.{i}.weight"], L[f"length_regulator.model.{i}.bias"] = (80, 80, 3), (80,)
        L[f"length_regulator.model.{i + 1}.weight"] = L[f"length_regulator.model.{i + 1}.bias"] = (80,)
    L["length_regulator.model.12.weight"], L["length_regulator.model.12.bias"] = (80, 80, 1), (80,)
    c, inner, tdim = s["est_ch"], s["heads"] * s["head_dim"], 4 * s["est_ch"]
    e = "decoder.estimator."
    L[e + "time_mlp.linear_1.weight"], L[e + "time_mlp.linear_1.bias"] = (tdim, 320), (tdim,)
    L[e + "time_mlp.linear_2.weight"], L[e + "time_mlp.linear_2.bias"] = (tdim, tdim), (tdim,)

    def resnet(p, cin, cout):
        L[p + "mlp.1.weight"], L[p + "mlp.1.bias"] = (cout, tdim), (cout,)
        L[p + "block1.block.0.weight"], L[p + "block1.block.0.bias"] = (cout, cin, 3), (cout,)
        L[p + "block2.block.0.weight"], L[p + "block2.block.0.bias"] = (cout, cout, 3), (cout,)
        for b in ("block1", "block2"):
            L[p + f"{b}.block.1.weight"] = L[p + f"{b}.block.1.bias"] = (cout,)
        L[p + "res_conv.weight"], L[p + "res_conv.bias"] = (cout, cin, 1), (cout,)

    def transformers(p):
        for j in range(s["n_blocks"]):
            q = f"{p}{j}."
            for n in ("norm1", "norm3"):
                L[q + f"{n}.weight"] = L[q + f"{n}.bias"] = (c,)
            for n in ("to_q", "to_k", "to_v"):
                L[q + f"attn1.{n}.weight"] = (inner, c)
            L[q + "attn1.to_out.0.weight"], L[q + "attn1.to_out.0.bias"] = (c, inner), (c,)
            L[q + "ff.net.0.proj.weight"], L[q + "ff.net.0.proj.bias"] = (4 * c, c), (4 * c,)
            L[q + "ff.net.2.weight"], L[q + "ff.net.2.bias"] = (c, 4 * c), (c,)

    resnet(e + "down_blocks.0.0.", 320, c), transformers(e + "down_blocks.0.1.")
    L[e + "down_blocks.0.2.conv.weight"], L[e + "down_blocks.0.2.conv.bias"] = (c, c, 3), (c,)
    resnet(e + "down_blocks.1.0.", c, c), transformers(e + "down_blocks.1.1.")
    L[e + "down_blocks.1.2.weight"], L[e + "down_blocks.1.2.bias"] = (c, c, 3), (c,)
    for i in range(s["mid_blocks"]):
        resnet(e + f"mid_blocks.{i}.0.", c, c), transformers(e + f"mid_blocks.{i}.1.")
    resnet(e + "up_blocks.0.0.", 2 * c, c), transformers(e + "up_blocks.0.1.")
    L[e + "up_blocks.0.2.conv.weight"], L[e + "up_blocks.0.2.conv.bias"] = (c, c, 4), (c,)
    resnet(e + "up_blocks.1.0.", 2 * c, c), transformers(e + "up_blocks.1.1.")
    L[e + "up_blocks.1.2.weight"], L[e + "up_blocks.1.2.bias"] = (c, c, 3), (c,)
    L[e + "final_block.block.0.weight"], L[e + "final_block.block.0.bias"] = (c, c, 3), (c,)
    L[e + "final_block.block.1.weight"] = L[e + "final_block.block.1.bias"] = (c,)
    L[e + "final_proj.weight"], L[e + "final_proj.bias"] = (80, c, 1), (80,)
    return L


def spec_hift_layout(s: dict) -> dict[str, tuple]:
    """hift.pt keys and shapes, SPEC.md §3.4 (weight norm as weight_g / weight_v)."""
    L: dict[str, tuple] = {}
    base, f0 = s["hift_ch"], s["f0_ch"]

    def wn_conv(p, cout, cin, k):
        L[p + ".weight_g"], L[p + ".weight_v"], L[p + ".bias"] = (cout, 1, 1), (cout, cin, k), (cout,)

    def resblock(p, ch, k):
        for conv in ("convs1", "convs2"):
            for j in range(3):
                wn_conv(f"{p}.{conv}.{j}", ch, ch, k)
        for act in ("activations1", "activations2"):
            for j in range(3):
                L[f"{p}.{act}.{j}.alpha"] = (ch,)

    wn_conv("conv_pre", base, 80, 7)
    for i in range(2):   # ConvTranspose1d: v [in, out, k], g over the in axis
        cin, cout = base // 2 ** i, base // 2 ** (i + 1)
        L[f"ups.{i}.weight_g"], L[f"ups.{i}.weight_v"], L[f"ups.{i}.bias"] = (cin, 1, 1), (cin, cout, 16), (cout,)
    L["source_downs.0.weight"], L["source_downs.0.bias"] = (base // 2, 18, 16), (base // 2,)
    L["source_downs.1.weight"], L["source_downs.1.bias"] = (base // 4, 18, 1), (base // 4,)
    resblock("source_resblocks.0", base // 2, 7)
    resblock("source_resblocks.1", base // 4, 11)
    for i, k in enumerate((3, 7, 11)):
        resblock(f"resblocks.{i}", base // 2, k)
        resblock(f"resblocks.{i + 3}", base // 4, k)
    wn_conv("conv_post", 18, base // 4, 7)
    L["m_source.l_linear.weight"], L["m_source.l_linear.bias"] = (1, 9), (1,)
    for j, i in enumerate((0, 2, 4, 6, 8)):
        wn_conv(f"f0_predictor.condnet.{i}", f0, 80 if j == 0 else f0, 3)
    L["f0_predictor.classifier.weight"], L["f0_predictor.classifier.bias"] = (1, f0), (1,)
    return L


# ----------------------------------------------------------------------------- random weights
def random_state_dict(layout: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Plausible random values: ~N(0, 1/fan_in) weights, norms near 1, small biases, Snake alpha
    near 1, weight_g near the row norm; f0 classifier biased to ~150 Hz (voiced source)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "alpha":
            t = 1.0 + 0.2 * torch.rand(shape, generator=g)
        elif leaf == "weight_g":
            t = 0.6 + 0.4 * torch.rand(shape, generator=g)
        elif leaf == "bias" or len(shape) == 1 and leaf == "weight":
            base = 1.0 if leaf == "weight" else 0.0
            t = base + 0.05 * torch.randn(shape, generator=g)
        elif leaf.startswith("pos_bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            if key.startswith("ups."):
                fan_in = shape[0] * shape[2] // 8
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[key] = t.float()
    if "f0_predictor.classifier.bias" in sd:
        sd["f0_predictor.classifier.bias"] = torch.tensor([150.0])
        sd["f0_predictor.classifier.weight"] = sd["f0_predictor.classifier.weight"] * 20.0
    if "conv_post.bias" in sd:   # keep log-magnitudes moderate so the waveform is not clipped flat
        sd["conv_post.bias"][:9] -= 2.0
    return sd


def campplus_onnx_bytes(seed: int = 0, dim: int = 192) -> bytes:
    """A campplus-like ONNX model: feats [1, T, 80] -> mean over time of relu(feats @ W) -> [1, dim]."""
    w = (np.random.default_rng(seed).standard_normal((80, dim)) / np.sqrt(80)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["feats", "W"], ["proj"]),
         helper.make_node("Relu", ["proj"], ["act"]),
         helper.make_node("ReduceMean", ["act"], ["embs"], axes=[1], keepdims=0)],
        "campplus_tiny",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embs", TensorProto.FLOAT, [1, dim])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_cosyvoice_dir(path: str, seed: int = 0, sizes: dict = TINY_SIZES, campplus: bool = True,
                        flow_sd=None, hift_sd=None) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "cosyvoice.yaml"), "w") as f:
        f.write(yaml_text(sizes))
    torch.save(flow_sd if flow_sd is not None else random_state_dict(spec_flow_layout(sizes), seed),
               os.path.join(path, "flow.pt"))
    torch.save(hift_sd if hift_sd is not None else random_state_dict(spec_hift_layout(sizes), seed + 1),
               os.path.join(path, "hift.pt"))
    if campplus:
        with open(os.path.join(path, "campplus.onnx"), "wb") as f:
            f.write(campplus_onnx_bytes(seed))
    return path


def random_speaker_prompt(seed: int = 0, n_tokens: int = 20, frames: int = 30) -> SpeakerPrompt:
    """A speaker prompt of random mel frames (around log-mel -4), embedding and speech tokens."""
    g = torch.Generator().manual_seed(seed)
    return SpeakerPrompt(torch.randn(frames, 80, generator=g) - 4, torch.randn(192, generator=g),
                         torch.randint(0, 5120, (n_tokens,), generator=g))


def random_speech_tokens(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 5120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
