"""Speech recognition heads of the streaming Paraformer (the rest of `model.pt` beyond the encoder
the tokenizer uses): FunASR's CifPredictorV2 and ParaformerSANMDecoder, as its streaming inference
(`ParaformerStreaming.generate_chunk`) runs them on encoder windows.

Per encoder window (5 carried rows + up to 4 new rows, all `after_norm` rows kept):
- predictor: weights alpha_t = relu(sigmoid(w . relu(conv3(h))_t) * smooth - noise), the conv
  (full 512 -> 512, kernel l_order + 1 + r_order, zero padded at the window's edges) over the
  window; rows from chunk_size[0] + chunk_size[1] = 4 on are zeroed except in the final window.
- CIF (`integrate_and_fire`): alphas accumulate over the windows' kept rows; each time the sum
  reaches the threshold (1.0) a token fires, its embedding the alpha-weighted sum of its rows, the
  overshoot starting the next one. The final window adds one zero row of alpha `tail_threshold`
  (0.45), so a last partial token of weight >= 0.55 still fires.
- decoder, on the tokens fired in a window (none fired: not run, caches untouched): 16 layers of
  x += fsmn(norm2(ff(norm1 x))) (a causal depthwise conv over every token decoded so far, kernel
  11, shift 5: 10 tokens back, none ahead), then x += cross_attention(norm3 x, memory) with memory
  the window's rows plus the last 4 rows (decoder look-back 1 chunk x 4) of the windows decoded
  before; then ff(norm1 x) with no residual (decoders3), after_norm, output_layer, argmax.

Config from config.yaml (`decoder_conf`, `predictor_conf`, `model_conf`); where a key is absent,
the value of FunASR's paraformer_streaming/template.yaml, which SPEC §4.1 follows. model.pt keys
under `decoder.` and `predictor.` are checked strictly; `decoder.embed.0.weight` (the training
sampler's token embedding) is checked and then released, as inference never reads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from .asr_vocabulary import Vocabulary
from .paraformer import LAYER_NORM_EPS, ParaformerEncoderConfig
from .weights import load_strict, read_torch_state_dict
from .yaml_reader import int_field, mapping_field, number_field, read_yaml


@dataclass(frozen=True)
class ASRConfig:
    size: int = 512                   # decoder attention dim = encoder output size
    decoder_heads: int = 4
    decoder_units: int = 2048
    decoder_blocks: int = 16
    decoder_kernel: int = 11
    decoder_shift: int = 5            # FunASR `sanm_shfit`: the FSMN window sits this far in the past
    l_order: int = 1
    r_order: int = 1
    threshold: float = 1.0
    tail_threshold: float = 0.45
    smooth_factor: float = 1.0
    noise_threshold: float = 0.0
    blank_id: int = 0
    sos_id: int = 1
    eos_id: int = 2
    # Step-Audio's streaming settings (tokenizer.py: chunk_size [0, 4, 5], decoder look-back 1)
    chunk_frames: int = 4
    decoder_look_back_chunks: int = 1

    @property
    def fsmn_left(self) -> int:
        return (self.decoder_kernel - 1) // 2 + self.decoder_shift

    @property
    def decoder_look_back_rows(self) -> int:
        return self.decoder_look_back_chunks * self.chunk_frames


def parse_asr_config(data: dict, encoder: ParaformerEncoderConfig, where: str = "config.yaml") -> ASRConfig:
    """The predictor and decoder settings of a FunASR config.yaml; ConfigError naming the field for
    a variant this engine does not run or a value it cannot use."""
    dec = mapping_field(data, "decoder_conf", where)
    pre = mapping_field(data, "predictor_conf", where)
    model = mapping_field(data, "model_conf", where)
    problems = []
    if str(data.get("decoder", "ParaformerSANMDecoder")) != "ParaformerSANMDecoder":
        problems.append(f"decoder {data.get('decoder')!r} (expected ParaformerSANMDecoder)")
    if str(data.get("predictor", "CifPredictorV2")) != "CifPredictorV2":
        problems.append(f"predictor {data.get('predictor')!r} (expected CifPredictorV2)")
    for key, expected in (("input_layer", "embed"), ("normalize_before", True), ("concat_after", False),
                          ("use_output_layer", True)):
        if key in dec and dec[key] != expected:
            problems.append(f"decoder_conf.{key} {dec[key]!r} (expected {expected!r})")
    if problems:
        raise ConfigError(f"{where}: unsupported Paraformer recognizer: " + "; ".join(problems))
    d, p, m = "decoder_conf", "predictor_conf", "model_conf"
    blocks = int_field(dec, d, "num_blocks", 16, where)
    att_layers = int_field(dec, d, "att_layer_num", blocks, where)
    if att_layers != blocks:
        raise ConfigError(f"{where}: `decoder_conf.att_layer_num` {att_layers} != num_blocks {blocks}: decoder "
                          "blocks without cross-attention are not supported")
    kernel = int_field(dec, d, "kernel_size", 11, where)
    shift = int_field(dec, d, "sanm_shfit", dec.get("sanm_shift", 5), where, minimum=0)
    if (kernel - 1) // 2 + shift != kernel - 1:
        raise ConfigError(f"{where}: `decoder_conf.sanm_shfit` {shift} with kernel_size {kernel} lets the decoder "
                          "FSMN look at later tokens; streaming decoding needs it causal "
                          f"(sanm_shfit = {(kernel - 1) - (kernel - 1) // 2})")
    idim = int_field(pre, p, "idim", encoder.output_size, where)
    if idim != encoder.output_size:
        raise ConfigError(f"{where}: `predictor_conf.idim` {idim} != encoder output_size {encoder.output_size}")
    cfg = ASRConfig(
        size=encoder.output_size, decoder_heads=int_field(dec, d, "attention_heads", 4, where),
        decoder_units=int_field(dec, d, "linear_units", 2048, where), decoder_blocks=blocks,
        decoder_kernel=kernel, decoder_shift=shift,
        l_order=int_field(pre, p, "l_order", 1, where, minimum=0),
        r_order=int_field(pre, p, "r_order", 1, where, minimum=0),
        threshold=number_field(pre, p, "threshold", 1.0, where, 1e-3, 1e3),
        tail_threshold=number_field(pre, p, "tail_threshold", 0.45, where, 0.0, 1e3),
        smooth_factor=number_field(pre, p, "smooth_factor", 1.0, where, 0.0, 1e3),
        noise_threshold=number_field(pre, p, "noise_threshold", 0.0, where, -1e3, 1e3),
        blank_id=int_field(model, m, "blank_id", 0, where, minimum=0),
        sos_id=int_field(model, m, "sos", 1, where, minimum=0), eos_id=int_field(model, m, "eos", 2, where, minimum=0),
        chunk_frames=encoder.chunk_frames)
    if cfg.size % cfg.decoder_heads:
        raise ConfigError(f"{where}: decoder size {cfg.size} is not divisible by `decoder_conf.attention_heads` "
                          f"{cfg.decoder_heads}")
    return cfg


# ---------------------------------------------------------------------------------- predictor
class CifPredictor(torch.nn.Module):
    """CifPredictorV2's weights (`predictor.*`) and its per-window alphas."""

    def __init__(self, cfg: ASRConfig):
        super().__init__()
        self.cfg = cfg
        self.cif_conv1d = torch.nn.Conv1d(cfg.size, cfg.size, cfg.l_order + cfg.r_order + 1)
        self.cif_output = torch.nn.Linear(cfg.size, 1)

    def window_alphas(self, rows: torch.Tensor, n_rows: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """alphas [W, R] (float32) of encoder windows rows [W, R, D] with n_rows [W] valid rows,
        final [W] bool: rows past n_rows are zero input (the window's edge) and get alpha 0; a
        non-final window keeps the alphas of its first chunk_frames rows only."""
        cfg = self.cfg
        r = rows.shape[1]
        pos = torch.arange(r, device=rows.device)
        valid = pos[None, :] < n_rows[:, None]
        x = (rows * valid[..., None]).transpose(1, 2)
        h = F.relu(F.conv1d(F.pad(x, (cfg.l_order, cfg.r_order)), self.cif_conv1d.weight, self.cif_conv1d.bias))
        logits = F.linear(h.transpose(1, 2), self.cif_output.weight, self.cif_output.bias)[..., 0]
        alphas = F.relu(torch.sigmoid(logits.float()) * cfg.smooth_factor - cfg.noise_threshold)
        kept = torch.where(final, n_rows, torch.clamp(n_rows, max=cfg.chunk_frames))
        return alphas * (pos[None, :] < kept[:, None])


def integrate_and_fire(alphas, integrate: float, threshold: float):
    """FunASR's CIF loop (CifPredictorV2.forward_chunk) over float32 alphas, from the carried sum
    `integrate`, in the same float32 steps (so tokens fire at the same frames). Returns (entries,
    fire_frames, integrate): entries (token, frame, weight) give each token's weighted frames, token 0
    being the one open before these frames and token len(fire_frames) the one left open after."""
    thr = np.float32(threshold)
    acc = np.float32(integrate)
    entries, fires = [], []
    for t, a in enumerate(np.asarray(alphas, dtype=np.float32)):
        if a + acc < thr:
            acc = np.float32(acc + a)
            if a:
                entries.append((len(fires), t, float(a)))
        else:
            entries.append((len(fires), t, float(np.float32(thr - acc))))
            fires.append(t)
            acc = np.float32(np.float32(acc + a) - thr)
            if acc:
                entries.append((len(fires), t, float(acc)))
    return entries, fires, float(acc)


# ---------------------------------------------------------------------------------- decoder
class _FeedForward(torch.nn.Module):
    """PositionwiseFeedForwardDecoderSANM: w_2(norm(relu(w_1 x))), w_2 without bias."""

    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.w_1 = torch.nn.Linear(size, hidden)
        self.w_2 = torch.nn.Linear(hidden, size, bias=False)
        self.norm = torch.nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.relu(self.w_1(x))), self.w_2.weight)


class _Fsmn(torch.nn.Module):
    def __init__(self, size: int, kernel: int):
        super().__init__()
        self.fsmn_block = torch.nn.Conv1d(size, size, kernel, groups=size, bias=False)


class _CrossAttention(torch.nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.linear_q = torch.nn.Linear(size, size)
        self.linear_k_v = torch.nn.Linear(size, 2 * size)
        self.linear_out = torch.nn.Linear(size, size)


class _DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ASRConfig):
        super().__init__()
        d = cfg.size
        self.norm1 = torch.nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.feed_forward = _FeedForward(d, cfg.decoder_units)
        self.norm2 = torch.nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.self_attn = _Fsmn(d, cfg.decoder_kernel)
        self.norm3 = torch.nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.src_attn = _CrossAttention(d)


class _LastLayer(torch.nn.Module):
    """decoders3: norm1 + feed forward, no attention and no residual."""

    def __init__(self, cfg: ASRConfig):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(cfg.size, eps=LAYER_NORM_EPS)
        self.feed_forward = _FeedForward(cfg.size, cfg.decoder_units)


class ParaformerDecoder(torch.nn.Module):
    """ParaformerSANMDecoder's weights (`decoder.*`) and its forward over fired tokens."""

    def __init__(self, cfg: ASRConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Sequential(torch.nn.Embedding(vocab_size, cfg.size))   # checked, then released
        self.decoders = torch.nn.ModuleList([_DecoderLayer(cfg) for _ in range(cfg.decoder_blocks)])
        self.decoders3 = torch.nn.ModuleList([_LastLayer(cfg)])
        self.after_norm = torch.nn.LayerNorm(cfg.size, eps=LAYER_NORM_EPS)
        self.output_layer = torch.nn.Linear(cfg.size, vocab_size)

    def new_history(self, batch: int, device, dtype) -> torch.Tensor:
        """Per layer, the FSMN inputs of the last fsmn_left tokens before the first (zeros: none)."""
        return torch.zeros(len(self.decoders), batch, self.cfg.fsmn_left, self.cfg.size, device=device, dtype=dtype)

    def _cross_attention(self, attn: _CrossAttention, x, memory, slots, valid):
        heads = self.cfg.decoder_heads
        b, t, d = x.shape
        dh = d // heads
        q = attn.linear_q(x).reshape(b, t, heads, dh).transpose(1, 2) * dh ** -0.5      # [B, H, T, dh]
        k, v = attn.linear_k_v(memory).split(d, dim=-1)                                  # [M, D] each
        s = slots.shape[-1]
        k = k[slots].reshape(b, t, s, heads, dh).permute(0, 3, 1, 2, 4)                 # [B, H, T, S, dh]
        v = v[slots].reshape(b, t, s, heads, dh).permute(0, 3, 1, 2, 4)
        scores = (q[..., None, :] * k).sum(-1).float()                                  # [B, H, T, S]
        mask = ~valid[:, None]
        probs = scores.masked_fill(mask, torch.finfo(scores.dtype).min).softmax(-1).masked_fill(mask, 0.0)
        ctx = (probs.to(v.dtype)[..., None] * v).sum(-2)                                # [B, H, T, dh]
        return attn.linear_out(ctx.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor, history: torch.Tensor, memory: torch.Tensor, slots: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] of tokens x [B, T, D] (padding tokens after the real ones are fine: the
        FSMN looks back only), with history [layers, B, fsmn_left, D] (`new_history` for none) and
        cross-attention to memory rows [M, D]: token (b, t) sees rows slots[b, t] where valid[b, t]
        ([B, T, S]). Returns (logits, the history after these tokens)."""
        cfg = self.cfg
        next_history = []
        for i, layer in enumerate(self.decoders):
            y = layer.norm2(layer.feed_forward(layer.norm1(x)))
            seq = torch.cat([history[i], y], dim=1)          # [B, left + T, D]; kernel = left + 1 (causal)
            next_history.append(seq[:, seq.shape[1] - cfg.fsmn_left:])
            mem = F.conv1d(seq.transpose(1, 2), layer.self_attn.fsmn_block.weight, groups=cfg.size)
            x = x + mem.transpose(1, 2) + y
            x = x + self._cross_attention(layer.src_attn, layer.norm3(x), memory, slots, valid)
        for layer in self.decoders3:
            x = layer.feed_forward(layer.norm1(x))
        return self.output_layer(self.after_norm(x)), torch.stack(next_history)


# ---------------------------------------------------------------------------------- loading
@dataclass
class ParaformerRecognizer:
    """The speech recognition heads and vocabulary loaded beside a Paraformer encoder."""
    cfg: ASRConfig
    predictor: CifPredictor
    decoder: ParaformerDecoder
    vocabulary: Vocabulary

    @property
    def device(self) -> torch.device:
        return self.decoder.after_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.after_norm.weight.dtype


def _prefixed(sd: dict, prefix: str) -> dict:
    out = {}
    for key, value in sd.items():
        name = key[len("module."):] if isinstance(key, str) and key.startswith("module.") else key
        if isinstance(name, str) and name.startswith(prefix):
            out[name[len(prefix):]] = value
    return out


def load_recognizer(folder: str | os.PathLike, encoder: ParaformerEncoderConfig, device="cpu",
                    dtype=torch.float32) -> ParaformerRecognizer:
    """Predictor, decoder and vocabulary from a FunASR model folder (config.yaml, model.pt,
    tokens.json). CheckpointError when model.pt holds no recognizer (a tokenizer-only folder) or
    its tensors or tokens.json disagree with the config; ConfigError for config values."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.yaml")
    cfg = parse_asr_config(read_yaml(config_path), encoder, config_path)
    ckpt = os.path.join(folder, "model.pt")
    sd = read_torch_state_dict(ckpt, mmap=True)
    dec, pre = _prefixed(sd, "decoder."), _prefixed(sd, "predictor.")
    if not dec and not pre:
        raise CheckpointError(f"{ckpt}: no decoder.* or predictor.* tensors: this Paraformer holds only the encoder, "
                              "so it can tokenize but not recognize speech")
    out = dec.get("output_layer.weight")
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise CheckpointError(f"{ckpt}: decoder.output_layer.weight is missing or not a matrix: the vocabulary "
                              "size cannot be read")
    vocabulary = Vocabulary.from_json(os.path.join(folder, "tokens.json"), out.shape[0], cfg.blank_id, cfg.sos_id,
                                      cfg.eos_id)
    with torch.device("meta"):
        predictor, decoder = CifPredictor(cfg), ParaformerDecoder(cfg, len(vocabulary))
    hints = {"output_layer.weight": "rows = tokens in tokens.json"}
    load_strict(predictor, pre, f"{ckpt} (predictor.*)")
    load_strict(decoder, dec, f"{ckpt} (decoder.*)", hints)
    decoder.embed = None            # the training sampler's input: never read at inference
    predictor = predictor.to(device=device, dtype=dtype).eval().requires_grad_(False)
    decoder = decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ParaformerRecognizer(cfg, predictor, decoder, vocabulary)
