"""Independent eager implementations of the official Step-Audio tokenizer path, written from the
SPEC formulas and the control flow of FunASR's online front end and streaming encoder, on the raw
fixture tensors (no stepvox code): tests compare stepvox against them."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
import torchaudio.compliance.kaldi as kaldi

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
