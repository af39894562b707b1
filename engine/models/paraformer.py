"""The linguistic (vq02) encoder: FunASR's streaming Paraformer SAN-M encoder, run the way
Step-Audio runs it (SPEC.md §4.3-4.4), from the released FunASR folder.

Step-Audio computes the encoder in streaming chunk mode even for whole files
(`infer_encoder` with chunk_size [0, 4, 5], encoder look-back 4). Each call sees a window of
5 carried rows (the last 5 input rows of the previous window; zeros at first) plus the call's new
LFR rows (4, or fewer in a final call). Every layer attends over the window plus a per-layer K/V
look-back of 16 rows: the K/V computed, in earlier windows, for each window's first rows (all but
the last 5). The FSMN memory sees only the window. Kept output: the window's new rows. So a frame
sees at most ~20 frames of the past and none of the future, and its code is NOT the one a single
full-sequence pass would give: "offline" in stepvox means this chunked computation over the
whole utterance, and a live stream reproduces it row for row.

Offline, all windows of all utterances are computed at once, layer by layer: a window's
look-back at layer l only needs layer-l K/V of earlier windows, which the same batched layer
produces, so no window waits for another. Streaming keeps the look-back in a per-session cache.

`LinguisticTokenizer` turns the encoder's rows into vq02 codes (nearest k-means centroid) and owns
how that runs: the window-count buckets and CUDA graphs of the offline path (one graph of the
whole encoder + code search per bucket) and the graph of one streaming call, which every live
stream replays with its own look-back cache copied in and out.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...kernels import KernelConfig
from ...kernels.nearest_centroid import nearest_centroid
from ...kernels.sanm import sanm_attention, sanm_attention_indexed
from ..device.graphs import GraphCache, bucket_length
from ..device.precision import matmul_precision
from ..device.staging import to_device
from ..errors import CheckpointError, ConfigError
from ..frontend.paraformer_features import FbankConfig, ParaformerFeatures, load_am_mvn
from .weights import load_strict, read_torch_state_dict
from .yaml_reader import int_field, mapping_field, read_yaml

PARAFORMER_SUBDIR = "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"
LAYER_NORM_EPS = 1e-12      # FunASR's LayerNorm


@dataclass(frozen=True)
class ParaformerEncoderConfig:
    input_size: int = 560
    output_size: int = 512
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 50
    kernel_size: int = 11
    sanm_shift: int = 0
    # Step-Audio's streaming settings (tokenizer.py): chunk_size [0, 4, 5], encoder look-back 4
    chunk_frames: int = 4
    carried_frames: int = 5
    look_back_chunks: int = 4

    @property
    def window_rows(self) -> int:
        return self.carried_frames + self.chunk_frames

    @property
    def look_back_rows(self) -> int:
        return self.look_back_chunks * self.chunk_frames

    @property
    def fsmn_left_pad(self) -> int:
        return (self.kernel_size - 1) // 2 + self.sanm_shift


MAX_FRAME_MS = 1000.0     # a longer fbank window is no speech front end (and its FFT grows with it)


def _ms_field(node: dict, section: str, key: str, default: float, where: str) -> float:
    value = node.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= MAX_FRAME_MS
    if not ok:
        raise ConfigError(f"{where}: `{section}.{key}` must be a number of ms in (0, {MAX_FRAME_MS:g}], "
                          f"got {value!r}")
    if int(value * 16) < 1:     # samples at 16 kHz, as FbankConfig computes them
        raise ConfigError(f"{where}: `{section}.{key}` = {value!r} ms is shorter than one sample at 16 kHz")
    return float(value)


def parse_paraformer_config(data: dict, where: str = "config.yaml") -> tuple[ParaformerEncoderConfig, FbankConfig]:
    """The encoder and front-end settings of a FunASR config.yaml; ConfigError naming the field and
    the value for a variant this engine does not run or a value it cannot use."""
    enc = mapping_field(data, "encoder_conf", where)
    fe = mapping_field(data, "frontend_conf", where)
    encoder_name = str(data.get("encoder", "SANMEncoderChunkOpt"))
    problems = []
    if encoder_name != "SANMEncoderChunkOpt":
        problems.append(f"encoder {encoder_name!r} (expected SANMEncoderChunkOpt)")
    if enc.get("input_layer", "pe_online") != "pe_online":
        problems.append(f"input_layer {enc.get('input_layer')!r} (expected pe_online)")
    if enc.get("selfattention_layer_type", "sanm") != "sanm":
        problems.append(f"selfattention_layer_type {enc.get('selfattention_layer_type')!r} (expected sanm)")
    if enc.get("normalize_before", True) is not True:
        problems.append(f"normalize_before {enc.get('normalize_before')!r} (expected true)")
    if str(fe.get("window", "hamming")) != "hamming":
        problems.append(f"frontend window {fe.get('window')!r} (expected hamming)")
    if fe.get("fs", 16000) != 16000 or isinstance(fe.get("fs"), bool):
        problems.append(f"frontend fs {fe.get('fs')!r} (expected 16000)")
    if problems:
        raise ConfigError(f"{where}: unsupported Paraformer variant: " + "; ".join(problems))
    f, e = "frontend_conf", "encoder_conf"
    fbank = FbankConfig(n_mels=int_field(fe, f, "n_mels", 80, where, minimum=4),   # Kaldi's mel bank needs > 3
                        frame_length_ms=_ms_field(fe, f, "frame_length", 25, where),
                        frame_shift_ms=_ms_field(fe, f, "frame_shift", 10, where),
                        lfr_m=int_field(fe, f, "lfr_m", 7, where), lfr_n=int_field(fe, f, "lfr_n", 6, where))
    if fbank.feature_dim % 2:
        raise ConfigError(f"{where}: n_mels * lfr_m = {fbank.feature_dim} must be even (the sinusoidal "
                          "positions fill it with sin and cos halves)")
    kernel_size = int_field(enc, e, "kernel_size", 11, where)
    shift_key = "sanm_shfit" if "sanm_shfit" in enc else "sanm_shift"    # FunASR's spelling first
    encoder = ParaformerEncoderConfig(
        input_size=fbank.feature_dim, output_size=int_field(enc, e, "output_size", 512, where),
        attention_heads=int_field(enc, e, "attention_heads", 4, where),
        linear_units=int_field(enc, e, "linear_units", 2048, where),
        num_blocks=int_field(enc, e, "num_blocks", 50, where), kernel_size=kernel_size,
        sanm_shift=int_field(enc, e, shift_key, 0, where, minimum=0))
    if encoder.output_size % encoder.attention_heads:
        raise ConfigError(f"{where}: `encoder_conf.output_size` {encoder.output_size} is not divisible by "
                          f"`encoder_conf.attention_heads` {encoder.attention_heads}")
    if encoder.fsmn_left_pad > kernel_size - 1:
        raise ConfigError(f"{where}: `encoder_conf.{shift_key}` {encoder.sanm_shift} shifts the FSMN window past "
                          f"its kernel_size {kernel_size}")
    return encoder, fbank


@functools.lru_cache(maxsize=8)
def _inv_timescales(depth: int, device: str) -> torch.Tensor:
    # computed on the CPU in float32 exactly as FunASR does, then moved (same bits everywhere)
    increment = torch.log(torch.tensor([10000.0])) / (depth / 2 - 1)
    return torch.exp(torch.arange(depth // 2).float() * -increment).to(device)


def sinusoid_positions(positions: torch.Tensor, depth: int) -> torch.Tensor:
    """FunASR's (Stream)SinusoidalPositionEncoder rows for 1-based float32 positions:
    [sin(p * inv), cos(p * inv)] with inv_k = exp(-k * ln(1e4) / (depth/2 - 1))."""
    inv = _inv_timescales(depth, str(positions.device))
    scaled = positions.float()[:, None] * inv[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class _SelfAttention(torch.nn.Module):
    def __init__(self, in_size: int, size: int, kernel_size: int):
        super().__init__()
        self.linear_q_k_v = torch.nn.Linear(in_size, 3 * size)
        self.linear_out = torch.nn.Linear(size, size)
        self.fsmn_block = torch.nn.Conv1d(size, size, kernel_size, groups=size, bias=False)


class _FeedForward(torch.nn.Module):
    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.w_1 = torch.nn.Linear(size, hidden)
        self.w_2 = torch.nn.Linear(hidden, size)


class SANMLayer(torch.nn.Module):
    def __init__(self, in_size: int, cfg: ParaformerEncoderConfig):
        super().__init__()
        size = cfg.output_size
        self.norm1 = torch.nn.LayerNorm(in_size, eps=LAYER_NORM_EPS)
        self.self_attn = _SelfAttention(in_size, size, cfg.kernel_size)
        self.norm2 = torch.nn.LayerNorm(size, eps=LAYER_NORM_EPS)
        self.feed_forward = _FeedForward(size, cfg.linear_units)
        self.residual = in_size == size     # FunASR skips the attention residual for encoders0


@dataclass
class OfflineWindows:
    """Inputs of `ParaformerEncoder.encode_windows` for a batch of utterances."""
    h: torch.Tensor | None          # [W, R, in] model dtype
    n_rows: torch.Tensor | None     # [W] int32: valid rows per window
    lb_len: torch.Tensor | None     # [W] int32: valid look-back rows
    index: torch.Tensor | None      # [W, L] int64: look-back rows in the flattened [W * R] K/V
    spans: list                     # per utterance (first window, windows, rows)
    windows: int                    # real windows (W - padding)


class StreamState:
    """One live stream's encoder state: the 5 carried input rows and the per-layer K/V look-back."""

    def __init__(self, cfg: ParaformerEncoderConfig, num_layers: int, device, dtype):
        self.carry = torch.zeros(cfg.carried_frames, cfg.input_size, device=device, dtype=dtype)
        shape = (num_layers, 1, cfg.look_back_rows, cfg.output_size)
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)
        self.look_back = 0        # valid look-back rows (right-aligned in the cache)
        self.rows_done = 0        # LFR rows encoded so far (for the positional encoding)


class ParaformerEncoder(torch.nn.Module):
    """SANMEncoderChunkOpt's streaming-chunk forward; module names follow model.pt (`encoder.*`)."""

    def __init__(self, cfg: ParaformerEncoderConfig, kernels: KernelConfig = KernelConfig()):
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        self.encoders0 = torch.nn.ModuleList([SANMLayer(cfg.input_size, cfg)])
        self.encoders = torch.nn.ModuleList([SANMLayer(cfg.output_size, cfg) for _ in range(cfg.num_blocks - 1)])
        self.after_norm = torch.nn.LayerNorm(cfg.output_size, eps=LAYER_NORM_EPS)

    @property
    def layers(self) -> list[SANMLayer]:
        return list(self.encoders0) + list(self.encoders)

    @property
    def dtype(self) -> torch.dtype:
        return self.after_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.after_norm.weight.device

    def embed(self, feats: torch.Tensor, first_position: int) -> torch.Tensor:
        """x * sqrt(output_size) + positional rows (1-based, continuing the stream), float32."""
        pos = torch.arange(first_position + 1, first_position + 1 + feats.shape[0], device=feats.device)
        return feats.float() * self.cfg.output_size ** 0.5 + sinusoid_positions(pos, feats.shape[1])

    def _layer(self, layer: SANMLayer, h, n_rows, lb_len, look_back):
        """One SAN-M layer on windows h [W, R, in]. `look_back` is either a function of the
        windows' own (k, v) returning this layer's [W, L, D] look-back keys/values, or an index
        [W, L] of look-back rows in the windows' own k, v flattened to [W * R, D].
        Returns (h, k, v)."""
        cfg = self.cfg
        d = cfg.output_size
        attn = layer.self_attn
        x = F.layer_norm(h, (h.shape[-1],), layer.norm1.weight, layer.norm1.bias, LAYER_NORM_EPS)
        q, k, v = F.linear(x, attn.linear_q_k_v.weight, attn.linear_q_k_v.bias).split(d, dim=-1)
        if isinstance(look_back, torch.Tensor):
            ctx, mem = sanm_attention_indexed(q, k, v, look_back, lb_len, n_rows, attn.fsmn_block.weight,
                                              cfg.attention_heads, cfg.fsmn_left_pad, backend=self.kernels.backend)
        else:
            lb_k, lb_v = look_back(k, v)
            ctx, mem = sanm_attention(q, k, v, lb_k, lb_v, lb_len, n_rows, attn.fsmn_block.weight,
                                      cfg.attention_heads, cfg.fsmn_left_pad, backend=self.kernels.backend)
        out = F.linear(ctx, attn.linear_out.weight, attn.linear_out.bias) + mem
        h = h + out if layer.residual else out
        ff = layer.feed_forward
        x = F.layer_norm(h, (d,), layer.norm2.weight, layer.norm2.bias, LAYER_NORM_EPS)
        h = h + F.linear(F.relu(F.linear(x, ff.w_1.weight, ff.w_1.bias)), ff.w_2.weight, ff.w_2.bias)
        return h, k, v

    # ------------------------------------------------------------------ offline (whole utterances)
    def prepare_offline(self, feats: list[torch.Tensor], counts: list[list[int]],
                        pad_windows_to: int | None = None) -> "OfflineWindows":
        """The windows of all utterances, stacked, and their metadata (`encode_windows` inputs).
        With `pad_windows_to`, neutral windows (zeros, all rows valid, no look-back) are appended
        up to that count; they are computed and ignored, and change no real window's result
        (no operation mixes windows except the look-back gather, which never points at them).
        A last call of 0 rows (after at least one other) is a tail window: the 5 carried rows
        alone, as FunASR's streaming ASR encodes them when the audio ends without a final call of
        its own (the tokenizer never asks for one). Metadata is built on the host and copied
        without a device sync."""
        cfg = self.cfg
        step, carry, r = cfg.chunk_frames, cfg.carried_frames, cfg.window_rows
        dev = self.device
        windows, spans = [], []
        n_rows, lb_len, lb_index = [], [], []
        first = 0
        for x, calls in zip(feats, counts):
            if sum(calls) != x.shape[0]:
                raise ValueError(f"encode_offline: {x.shape[0]} rows but calls sum to {sum(calls)}")
            tail_alone = calls == [0]
            if any(c != step for c in calls[:-1]) or (calls and not 0 <= calls[-1] <= step) or tail_alone:
                raise ValueError(f"encode_offline: calls must be {step} rows each but the last, got {calls}")
            c = len(calls)
            spans.append((first, c, x.shape[0]))
            if c == 0:
                continue
            y = self.embed(x.to(dev), 0)
            z = F.pad(y, (0, 0, carry, step * c + r - carry - y.shape[0]))      # 5 zero rows in front
            windows.append(z.unfold(0, r, step)[:c].transpose(1, 2))          # [c, R, in]
            n_rows.append(torch.tensor(calls, dtype=torch.int32) + carry)
            idx = torch.arange(c)
            lb_len.append(torch.clamp(idx * step, max=cfg.look_back_rows).to(torch.int32))
            # look-back slot m of window w holds row m % step of window w - L/step + m // step
            slot = torch.arange(cfg.look_back_rows)
            src_win = idx[:, None] - cfg.look_back_chunks + slot[None, :] // step
            lb_index.append((first + src_win.clamp(min=0)) * r + slot[None, :] % step)
            first += c
        total = max(first, pad_windows_to or 0)
        if total > first:
            pad = total - first
            windows.append(torch.zeros(pad, r, cfg.input_size, device=dev))
            n_rows.append(torch.full((pad,), r, dtype=torch.int32))
            lb_len.append(torch.zeros(pad, dtype=torch.int32))
            lb_index.append(torch.zeros(pad, cfg.look_back_rows, dtype=torch.long))
        if total == 0:
            return OfflineWindows(None, None, None, None, spans, 0)
        h = torch.cat(windows).to(self.dtype)
        meta = torch.stack([torch.cat(n_rows), torch.cat(lb_len)])
        return OfflineWindows(h, to_device(meta[0], dev), to_device(meta[1], dev),
                              to_device(torch.cat(lb_index), dev), spans, first)

    def encode_windows(self, h: torch.Tensor, n_rows: torch.Tensor, lb_len: torch.Tensor,
                       index: torch.Tensor, all_rows: bool = False) -> torch.Tensor:
        """All 50 layers + after_norm over windows [W, R, in]; returns the new rows of each window
        [W, step, D], or with `all_rows` every row of each window [W, R, D] (the speech
        recognition heads read the carried rows too; rows past n_rows are padding). No host sync,
        fixed shapes: graph-capturable."""
        cfg = self.cfg
        for layer in self.layers:
            h = self._layer(layer, h, n_rows, lb_len, index)[0]
        rows = h if all_rows else h[:, cfg.carried_frames:cfg.carried_frames + cfg.chunk_frames]
        return F.layer_norm(rows, (cfg.output_size,), self.after_norm.weight, self.after_norm.bias, LAYER_NORM_EPS)

    def encode_offline(self, feats: list[torch.Tensor], counts: list[list[int]]) -> list[torch.Tensor]:
        """Encoder outputs [N_i, D] of utterances given their CMVN'd LFR rows [N_i, in] and rows per
        call (`paraformer_features.chunk_row_counts`); every utterance equals its own streamed run."""
        wins = self.prepare_offline(feats, counts)
        new_rows = self.encode_windows(wins.h, wins.n_rows, wins.lb_len, wins.index) if wins.windows else None
        return [new_rows[a:a + c].reshape(-1, self.cfg.output_size)[:n] if c else
                torch.zeros(0, self.cfg.output_size, device=self.device, dtype=self.dtype)
                for a, c, n in wins.spans]

    # ------------------------------------------------------------------ streaming (one call)
    def new_stream(self) -> StreamState:
        return StreamState(self.cfg, len(self.layers), self.device, self.dtype)

    def window_for(self, state: StreamState, feats: torch.Tensor) -> torch.Tensor:
        """The [1, R, in] window of one call: carried rows + the call's embedded rows, zero-padded."""
        y = self.embed(feats.to(self.device), state.rows_done).to(self.dtype)
        window = torch.cat([state.carry, y])
        return F.pad(window, (0, 0, 0, self.cfg.window_rows - window.shape[0]))[None]

    def stream_step(self, window: torch.Tensor, new: int, look_back: int, cache_k: torch.Tensor,
                    cache_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode one call's window [1, R, in] holding `new` new rows with the look-back caches
        [layers, 1, L, D] (`look_back` valid rows, right-aligned). Returns the after_norm output
        [1, R, D] (new rows at [carried: carried + new]) and the advanced caches: each layer's
        cache drops its oldest `new` rows and takes the K/V of the window's first `new` rows."""
        cfg = self.cfg
        dev = window.device
        n_rows = torch.full((1,), cfg.carried_frames + new, device=dev, dtype=torch.int32)
        lb_len = torch.full((1,), look_back, device=dev, dtype=torch.int32) if isinstance(look_back, int) \
            else look_back
        h = window
        next_k, next_v = [], []
        for i, layer in enumerate(self.layers):
            h, k, v = self._layer(layer, h, n_rows, lb_len, lambda k, v, i=i: (cache_k[i], cache_v[i]))
            next_k.append(torch.cat([cache_k[i][:, new:], k[:, :new]], dim=1))
            next_v.append(torch.cat([cache_v[i][:, new:], v[:, :new]], dim=1))
        out = F.layer_norm(h, (cfg.output_size,), self.after_norm.weight, self.after_norm.bias, LAYER_NORM_EPS)
        return out, torch.stack(next_k), torch.stack(next_v)

    def advance(self, state: StreamState, window: torch.Tensor, new: int) -> None:
        state.carry = window[0, new:new + self.cfg.carried_frames]
        state.look_back = min(self.cfg.look_back_rows, state.look_back + new)
        state.rows_done += new


WINDOW_UNIT = 4                 # offline graph buckets: whole units of 4 windows (0.96 s) up to 5 units,
WINDOW_GEOMETRIC_AFTER = 5      # then steps of ~x1.25,
MAX_GRAPH_WINDOWS = 2560        # up to ~10 min of audio per call (longer calls run eagerly)


class LinguisticTokenizer:
    """vq02 codes of Paraformer encoder rows: the nearest row of the k-means codebook [K, D].

    `launch(feats, counts)` enqueues the codes of whole utterances: all their windows in one batch,
    padded to a window-count bucket when CUDA graphs are on (`bucket_eager` pads eager runs the same
    way, which is how the CPU tests exercise the graphs' inputs). `stream()` gives a live stream's
    encoder side, one 240 ms call at a time."""

    def __init__(self, encoder: ParaformerEncoder, codebook: torch.Tensor, *, use_cuda_graphs: bool = True,
                 bucket_eager: bool = False, tf32: bool = False):
        self.encoder = encoder
        self.device = encoder.device
        self.codebook = codebook.to(self.device, torch.float32)
        self.sqnorm = self.codebook.pow(2).sum(-1)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.bucket_eager = bucket_eager
        self.tf32 = tf32
        self.offline_graphs = GraphCache(self._offline_body, self._offline_static, self.device)
        self.step_graphs = GraphCache(self._step_body, self._step_static, self.device)

    @property
    def graph_count(self) -> int:
        return len(self.offline_graphs) + len(self.step_graphs)

    def codes_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return nearest_centroid(rows.float(), self.codebook, self.sqnorm, backend=self.encoder.kernels.backend)

    # ------------------------------------------------------------------ offline
    def _offline_body(self, windows, h, n_rows, lb_len, index) -> torch.Tensor:
        with matmul_precision(self.tf32, self.device):
            rows = self.encoder.encode_windows(h, n_rows, lb_len, index)
        return self.codes_of_rows(rows.reshape(-1, rows.shape[-1]))

    def _offline_static(self, windows: int):
        cfg, dev = self.encoder.cfg, self.device
        return (torch.zeros(windows, cfg.window_rows, cfg.input_size, device=dev, dtype=self.encoder.dtype),
                torch.full((windows,), cfg.window_rows, device=dev, dtype=torch.int32),
                torch.zeros(windows, device=dev, dtype=torch.int32),
                torch.zeros(windows, cfg.look_back_rows, device=dev, dtype=torch.long))

    def launch(self, feats: list[torch.Tensor], counts: list[list[int]]):
        """Enqueue the codes of utterances given their front-end rows and rows per call: (flat codes
        on the device, or None when there are none; per utterance (first code, count)). No host sync."""
        step = self.encoder.cfg.chunk_frames
        total = sum(len(c) for c in counts)
        graphs = self.use_cuda_graphs and 0 < total <= MAX_GRAPH_WINDOWS
        pad_to = bucket_length(total, WINDOW_UNIT, geometric_after=WINDOW_GEOMETRIC_AFTER) \
            if total and (graphs or self.bucket_eager) else None
        wins = self.encoder.prepare_offline(list(feats), list(counts), pad_windows_to=pad_to)
        spans = [(first * step, n) for first, _, n in wins.spans]
        if not wins.windows:
            return None, spans
        inputs = (wins.h, wins.n_rows, wins.lb_len, wins.index)
        if graphs:
            with self.offline_graphs.lock:
                return self.offline_graphs.run(pad_to, inputs).clone(), spans
        return self._offline_body(pad_to, *inputs), spans

    def warmup(self, max_windows: int) -> None:
        """Capture the offline graphs of every window bucket up to `max_windows` (no-op without graphs)."""
        if not self.use_cuda_graphs:
            return
        top = bucket_length(min(max_windows, MAX_GRAPH_WINDOWS), WINDOW_UNIT, geometric_after=WINDOW_GEOMETRIC_AFTER)
        w = WINDOW_UNIT
        while w <= top:
            with self.offline_graphs.lock:
                self.offline_graphs.entry(w)
            w = bucket_length(w + 1, WINDOW_UNIT, geometric_after=WINDOW_GEOMETRIC_AFTER)

    # ------------------------------------------------------------------ streaming
    def _step_body(self, key, window, look_back, cache_k, cache_v):
        cfg = self.encoder.cfg
        with matmul_precision(self.tf32, self.device):
            out, k, v = self.encoder.stream_step(window, cfg.chunk_frames, look_back, cache_k, cache_v)
        rows = out[0, cfg.carried_frames:cfg.carried_frames + cfg.chunk_frames]
        return out[0], self.codes_of_rows(rows), k, v

    def _step_static(self, key):
        cfg, enc = self.encoder.cfg, self.encoder
        shape = (len(enc.layers), 1, cfg.look_back_rows, cfg.output_size)
        return (torch.zeros(1, cfg.window_rows, cfg.input_size, device=self.device, dtype=enc.dtype),
                torch.zeros(1, device=self.device, dtype=torch.int32),
                torch.zeros(shape, device=self.device, dtype=enc.dtype),
                torch.zeros(shape, device=self.device, dtype=enc.dtype))

    def step(self, state: StreamState, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One streaming call of `rows` new LFR rows: (new encoder rows, their codes), state advanced.
        A full call replays the step graph (one for every stream: the stream's look-back cache is
        copied in and the advanced one out); a short final call runs eagerly."""
        window_rows, codes = self.step_window(state, rows)
        return window_rows[self.encoder.cfg.carried_frames:], codes

    def step_window(self, state: StreamState, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `step`, but returning every after_norm row of the call's window [carried + new, D],
        carried rows first (the speech recognizer reads them all); 0 new rows is a tail window."""
        enc, cfg = self.encoder, self.encoder.cfg
        new = rows.shape[0]
        window = enc.window_for(state, rows)
        if self.use_cuda_graphs and new == cfg.chunk_frames:
            with self.step_graphs.lock:
                graph, static, outputs = self.step_graphs.entry(None)
                static[0].copy_(window)
                static[1].fill_(state.look_back)
                static[2].copy_(state.cache_k)
                static[3].copy_(state.cache_v)
                graph.replay()
                out, codes, state.cache_k, state.cache_v = (t.clone() for t in outputs)
        else:
            with matmul_precision(self.tf32, self.device):
                full, state.cache_k, state.cache_v = enc.stream_step(window, new, state.look_back, state.cache_k,
                                                                     state.cache_v)
            out = full[0]
            fresh = out[cfg.carried_frames:cfg.carried_frames + new]
            codes = self.codes_of_rows(fresh) if new else torch.zeros(0, dtype=torch.long, device=out.device)
        enc.advance(state, window, new)
        return out[:cfg.carried_frames + new], codes

    def stream(self) -> "LinguisticStream":
        return LinguisticStream(self)


class LinguisticStream:
    """Encoder side of one live stream: LFR rows in (one block per front-end call), codes out."""

    def __init__(self, tokenizer: LinguisticTokenizer):
        self.tokenizer = tokenizer
        self.state = tokenizer.encoder.new_stream()

    def step(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(new encoder rows, their codes) of one front-end call's rows."""
        return self.tokenizer.step(self.state, rows)


# ---------------------------------------------------------------------------------- loading
def encoder_state_dict(sd: dict, where: str) -> dict[str, torch.Tensor]:
    """The `encoder.*` tensors of a full Paraformer state dict, prefix removed (decoder,
    predictor and anything else are ignored)."""
    out = {}
    for key, value in sd.items():
        name = key[len("module."):] if isinstance(key, str) and key.startswith("module.") else key
        if isinstance(name, str) and name.startswith("encoder."):
            out[name[len("encoder."):]] = value
    if not out:
        raise CheckpointError(f"{where}: no encoder.* tensors found")
    return out


def load_paraformer(folder: str | os.PathLike, device="cpu", dtype=torch.float32,
                    kernels: KernelConfig = KernelConfig()) -> tuple[ParaformerEncoder, ParaformerFeatures]:
    """Encoder and front end from a FunASR model folder (config.yaml, am.mvn, model.pt)."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.yaml")
    enc_cfg, fbank_cfg = parse_paraformer_config(read_yaml(config_path), config_path)
    shift, scale = load_am_mvn(os.path.join(folder, "am.mvn"), fbank_cfg.feature_dim)
    ckpt = os.path.join(folder, "model.pt")
    tensors = encoder_state_dict(read_torch_state_dict(ckpt, mmap=True), ckpt)
    blocks = 1 + len({k.split(".")[1] for k in tensors if k.startswith("encoders.")})
    if blocks != enc_cfg.num_blocks:
        raise CheckpointError(f"{ckpt}: has {blocks} encoder blocks but config.yaml says num_blocks {enc_cfg.num_blocks}")
    with torch.device("meta"):
        encoder = ParaformerEncoder(enc_cfg, kernels)
    load_strict(encoder, tensors, ckpt)
    encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return encoder, ParaformerFeatures(fbank_cfg, shift, scale).to(device)
