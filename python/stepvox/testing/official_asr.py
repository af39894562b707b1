"""An independent eager rendering of FunASR's streaming Paraformer recognition
(`ParaformerStreaming.inference` -> `generate_chunk`: SANMEncoderChunkOpt.forward_chunk,
CifPredictorV2.forward_chunk, ParaformerSANMDecoder.forward_chunk, CharTokenizer ids2tokens,
postprocess_utils.sentence_postprocess) with Step-Audio's chunk settings, on the raw fixture tensors
and with no stepvox model code: step by step, caches as FunASR keeps them, sequential CIF loop.

One rule is upstream FunASR's rather than Step-Audio's copy: when the audio ends without a final
call of its own (the last piece gives no feature row), the carried rows are encoded as a tail chunk
so that the final predictor step still runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .official_tokenizer import CHUNK, OfficialFrontend

CHUNK_SIZE = (0, 4, 5)
ENCODER_LOOK_BACK = 4
DECODER_LOOK_BACK = 1


def _ln(x, sd, p):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], 1e-12)


class OfficialStreamingParaformer:
    """One utterance's caches (FunASR's init_cache) and its chunk steps."""

    def __init__(self, sd: dict, enc_heads: int, dec_heads: int, tokens: list[str], tail_threshold: float = 0.45):
        self.sd = sd
        self.enc_heads, self.dec_heads = enc_heads, dec_heads
        self.tokens = tokens
        self.tail_threshold = tail_threshold
        self.d = sd["encoder.after_norm.weight"].shape[0]
        self.enc_layers = ["encoder.encoders0.0"] + sorted(
            {".".join(k.split(".")[:3]) for k in sd if k.startswith("encoder.encoders.")},
            key=lambda s: int(s.split(".")[2]))
        self.dec_layers = sorted({".".join(k.split(".")[:3]) for k in sd if k.startswith("decoder.decoders.")},
                                 key=lambda s: int(s.split(".")[2]))
        feat_dim = sd["encoder.encoders0.0.norm1.weight"].shape[0]
        # cache["encoder"]
        self.start_idx = 0
        self.cif_hidden = torch.zeros(1, 1, self.d)
        self.cif_alphas = torch.zeros(1, 1)
        self.feats = torch.zeros(1, CHUNK_SIZE[0] + CHUNK_SIZE[2], feat_dim)
        self.enc_opt = None
        # cache["decoder"]
        self.decode_fsmn = None
        self.dec_opt = None

    # ------------------------------------------------------------------ encoder
    def encoder_chunk(self, speech: torch.Tensor | None) -> torch.Tensor:
        """forward_chunk on new LFR rows [t, 560], or the tail chunk (None): the cached rows alone."""
        if speech is None:
            xs = self.feats
        else:
            xs = speech[None] * self.d ** 0.5
            t, depth = xs.shape[1], xs.shape[2]
            pos = torch.arange(1, t + self.start_idx + 1)[None].float()
            inc = torch.log(torch.tensor([10000.0])) / (depth / 2 - 1)
            inv = torch.exp(torch.arange(depth / 2).float() * -inc).reshape(1, -1)
            scaled = pos.reshape(1, -1, 1) * inv.reshape(1, 1, -1)
            pe = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=2)
            xs = xs + pe[:, self.start_idx:self.start_idx + t]
            self.start_idx += t
            xs = torch.cat([self.feats, xs], dim=1)
            self.feats = xs[:, -(CHUNK_SIZE[0] + CHUNK_SIZE[2]):]
        if self.enc_opt is None:
            self.enc_opt = [None] * len(self.enc_layers)
        sd, d, heads = self.sd, self.d, self.enc_heads
        dk = d // heads
        for li, p in enumerate(self.enc_layers):
            residual = xs
            x = _ln(xs, sd, p + ".norm1")
            qkv = F.linear(x, sd[p + ".self_attn.linear_q_k_v.weight"], sd[p + ".self_attn.linear_q_k_v.bias"])
            q, k, v = torch.split(qkv, d, dim=-1)
            b, n, _ = q.shape
            q_h, k_h, v_h = (z.reshape(b, n, heads, dk).transpose(1, 2) for z in (q, k, v))
            cache = self.enc_opt[li]
            if cache is not None:
                k_stride, v_stride = k_h[:, :, :-CHUNK_SIZE[2]], v_h[:, :, :-CHUNK_SIZE[2]]
                k_h = torch.cat([cache["k"], k_h], dim=2)
                v_h = torch.cat([cache["v"], v_h], dim=2)
                cache["k"] = torch.cat([cache["k"], k_stride], dim=2)[:, :, -(ENCODER_LOOK_BACK * CHUNK_SIZE[1]):]
                cache["v"] = torch.cat([cache["v"], v_stride], dim=2)[:, :, -(ENCODER_LOOK_BACK * CHUNK_SIZE[1]):]
            else:
                self.enc_opt[li] = {"k": k_h[:, :, :-CHUNK_SIZE[2]], "v": v_h[:, :, :-CHUNK_SIZE[2]]}
            w = sd[p + ".self_attn.fsmn_block.weight"]
            left = (w.shape[-1] - 1) // 2
            fsmn = F.conv1d(F.pad(v.transpose(1, 2), (left, w.shape[-1] - 1 - left)), w, groups=d).transpose(1, 2) + v
            att = torch.softmax((q_h * dk ** -0.5) @ k_h.transpose(-2, -1), dim=-1) @ v_h
            att = F.linear(att.transpose(1, 2).reshape(b, n, d), sd[p + ".self_attn.linear_out.weight"],
                           sd[p + ".self_attn.linear_out.bias"]) + fsmn
            xs = residual + att if residual.shape[-1] == d else att
            y = _ln(xs, sd, p + ".norm2")
            y = F.linear(F.relu(F.linear(y, sd[p + ".feed_forward.w_1.weight"], sd[p + ".feed_forward.w_1.bias"])),
                         sd[p + ".feed_forward.w_2.weight"], sd[p + ".feed_forward.w_2.bias"])
            xs = xs + y
        return _ln(xs, sd, "encoder.after_norm")

    # ------------------------------------------------------------------ predictor
    def predictor_chunk(self, hidden: torch.Tensor, is_final: bool):
        sd = self.sd
        batch, _, size = hidden.shape
        context = hidden.transpose(1, 2)
        w = sd["predictor.cif_conv1d.weight"]
        pad = (w.shape[-1] - 1) // 2
        out = torch.relu(F.conv1d(F.pad(context, (pad, pad)), w, sd["predictor.cif_conv1d.bias"]))
        out = F.linear(out.transpose(1, 2), sd["predictor.cif_output.weight"], sd["predictor.cif_output.bias"])
        alphas = torch.nn.functional.relu(torch.sigmoid(out) * 1.0 - 0).squeeze(-1)
        alphas[:, :CHUNK_SIZE[0]] = 0.0
        if not is_final:
            alphas[:, sum(CHUNK_SIZE[:2]):] = 0.0
        hidden = torch.cat([self.cif_hidden, hidden], dim=1)
        alphas = torch.cat([self.cif_alphas, alphas], dim=1)
        if is_final:
            hidden = torch.cat([hidden, torch.zeros(batch, 1, size)], dim=1)
            alphas = torch.cat([alphas, torch.tensor([[self.tail_threshold]])], dim=1)
        threshold = 1.0
        integrate = 0.0
        frames = torch.zeros(size)
        list_frame = []
        for t in range(alphas.shape[1]):
            alpha = alphas[0][t]
            if alpha + integrate < threshold:
                integrate += alpha
                frames += alpha * hidden[0][t]
            else:
                frames += (threshold - integrate) * hidden[0][t]
                list_frame.append(frames)
                integrate += alpha
                integrate -= threshold
                frames = integrate * hidden[0][t]
        self.cif_alphas = torch.as_tensor(integrate).reshape(1, 1).float()
        self.cif_hidden = (frames / integrate if integrate > 0.0 else frames).reshape(1, 1, -1)
        if not list_frame:
            return None
        return torch.stack(list_frame)[None]

    # ------------------------------------------------------------------ decoder
    def _ffn(self, x, p):
        sd = self.sd
        h = torch.relu(F.linear(x, sd[p + ".feed_forward.w_1.weight"], sd[p + ".feed_forward.w_1.bias"]))
        return F.linear(_ln(h, sd, p + ".feed_forward.norm"), sd[p + ".feed_forward.w_2.weight"])

    def decoder_chunk(self, memory: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        sd, d, heads = self.sd, self.d, self.dec_heads
        dk = d // heads
        if self.decode_fsmn is None:
            self.decode_fsmn = [None] * len(self.dec_layers)
        if self.dec_opt is None:
            self.dec_opt = [None] * len(self.dec_layers)
        x = tgt
        for i, p in enumerate(self.dec_layers):
            residual = x
            t = self._ffn(_ln(x, sd, p + ".norm1"), p)
            t = _ln(t, sd, p + ".norm2")
            w = sd[p + ".self_attn.fsmn_block.weight"]
            kernel = w.shape[-1]
            left = (kernel - 1) // 2 + 5                     # sanm_shfit 5
            xt = t.transpose(1, 2)
            cache = self.decode_fsmn[i]
            if cache is None:
                xt = F.pad(xt, (left, kernel - 1 - left))
            else:
                xt = torch.cat([cache[:, :, 1:], xt], dim=2)[:, :, -(kernel + t.shape[1] - 1):]
            self.decode_fsmn[i] = xt
            fsmn = F.conv1d(xt, w, groups=d).transpose(1, 2) + t
            x = residual + fsmn
            residual = x
            y = _ln(x, sd, p + ".norm3")
            q = F.linear(y, sd[p + ".src_attn.linear_q.weight"], sd[p + ".src_attn.linear_q.bias"])
            kv = F.linear(memory, sd[p + ".src_attn.linear_k_v.weight"], sd[p + ".src_attn.linear_k_v.bias"])
            k, v = torch.split(kv, d, dim=-1)
            q_h = q.reshape(1, -1, heads, dk).transpose(1, 2)
            k_h = k.reshape(1, -1, heads, dk).transpose(1, 2)
            v_h = v.reshape(1, -1, heads, dk).transpose(1, 2)
            look = DECODER_LOOK_BACK * CHUNK_SIZE[1]
            opt = self.dec_opt[i]
            if opt is not None:
                k_h = torch.cat([opt["k"], k_h], dim=2)
                v_h = torch.cat([opt["v"], v_h], dim=2)
                opt["k"], opt["v"] = k_h[:, :, -look:], v_h[:, :, -look:]
            else:
                self.dec_opt[i] = {"k": k_h[:, :, -look:], "v": v_h[:, :, -look:]}
            att = torch.softmax((q_h * dk ** -0.5) @ k_h.transpose(-2, -1), dim=-1) @ v_h
            att = F.linear(att.transpose(1, 2).reshape(1, -1, d), sd[p + ".src_attn.linear_out.weight"],
                           sd[p + ".src_attn.linear_out.bias"])
            x = residual + att
        x = self._ffn(_ln(x, sd, "decoder.decoders3.0.norm1"), "decoder.decoders3.0")
        x = _ln(x, sd, "decoder.after_norm")
        return F.linear(x, sd["decoder.output_layer.weight"], sd["decoder.output_layer.bias"])

    # ------------------------------------------------------------------ one call
    def generate_chunk(self, speech: torch.Tensor | None, is_final: bool) -> list[int]:
        encoder_out = self.encoder_chunk(speech)
        embeds = self.predictor_chunk(encoder_out, is_final)
        if embeds is None:
            return []
        scores = torch.log_softmax(self.decoder_chunk(encoder_out, embeds), dim=-1)
        ids = scores[0].argmax(dim=-1).tolist()
        return [i for i in ids if i not in (2, 1, 0)]       # eos, sos, blank


def official_recognize(wav16k: torch.Tensor, fixture: dict, sizes) -> tuple[list[int], str]:
    """FunASR's streaming inference over a whole 16 kHz file: (token ids, text)."""
    model = OfficialStreamingParaformer(fixture["paraformer"], sizes.p_heads, sizes.p_heads, fixture["tokens"])
    fe = OfficialFrontend(*fixture["cmvn"])
    n = wav16k.numel() // CHUNK + 1
    ids, ran = [], False
    for i in range(n):
        final = i == n - 1
        piece = wav16k[i * CHUNK:(i + 1) * CHUNK]
        rows = None
        if piece.numel():
            try:
                rows = fe(piece, final)
            except RuntimeError:
                if not final:
                    raise
        if rows is None or rows.shape[0] == 0:
            assert final, "a non-final call produced no rows"
            if ran:
                ids += model.generate_chunk(None, True)          # tail chunk
            break
        ids += model.generate_chunk(rows, final)
        ran = True
    return ids, sentence_postprocess([fixture["tokens"][i] for i in ids])


# ------------------------------------------------------------------ FunASR's text postprocessing, step by step
def _is_chinese(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u0030" <= ch <= "\u0039" or ch == "@"


def _washed(word) -> list[str]:
    out = []
    for i in word:
        cur = i.replace(" ", "")
        for s in ("</s>", "<s>", "<unk>", "<OOV>"):
            cur = cur.replace(s, "")
        out.append(cur)
    return out


def _is_all_chinese(word) -> bool:
    items = _washed(word)
    if not items:
        return False
    return all(_is_chinese(ch) for ch in items)


def _is_all_alpha(word) -> bool:
    items = _washed(word)
    if not items:
        return False
    for ch in items:
        if not ch.isalpha() and ch != "'":
            return False
        if ch.isalpha() and _is_chinese(ch):
            return False
    return True


def _abbr_dispose(words: list[str]) -> list[str]:
    size = len(words)
    begins, ends = [], []
    last = -1
    for num in range(size):
        if num <= last:
            continue
        if len(words[num]) == 1 and words[num].encode("utf-8").isalpha():
            if num + 2 < size and words[num + 1] == " " and len(words[num + 2]) == 1 \
                    and words[num + 2].encode("utf-8").isalpha():
                begins.append(num)
                num += 2
                ends.append(num)
                while True:
                    num += 1
                    if num < size and words[num] == " ":
                        num += 1
                        if num < size and len(words[num]) == 1 and words[num].encode("utf-8").isalpha():
                            ends[-1] = num
                            last = num
                        else:
                            break
                    else:
                        break
    out = []
    last = -1
    for num in range(size):
        if num <= last:
            continue
        if num in begins:
            word = words[num].upper()
            num += 1
            while num < size:
                if num in ends:
                    word += words[num].upper()
                    last = num
                    break
                if words[num].encode("utf-8").isalpha():
                    word += words[num].upper()
                num += 1
            out.append(word)
        else:
            out.append(words[num])
    return out


def sentence_postprocess(words: list[str]) -> str:
    middle = [w for w in words if w not in ("<s>", "</s>", "<unk>", "<OOV>")]
    out = []
    item = ""
    if _is_all_chinese(middle):
        out = [ch.replace(" ", "") for ch in middle]
    elif _is_all_alpha(middle):
        for ch in middle:
            if "@@" in ch:
                item += ch.replace("@@", "")
            else:
                item += ch
                out += [item, " "]
                item = ""
    else:
        alpha_blank = False
        for ch in middle:
            if _is_all_chinese(ch):
                if alpha_blank:
                    out.pop()
                out.append(ch)
                alpha_blank = False
            elif "@@" in ch:
                item += ch.replace("@@", "")
                alpha_blank = False
            elif _is_all_alpha(ch):
                item += ch
                out += [item, " "]
                item = ""
                alpha_blank = True
            else:
                out.append(ch)
    return "".join(_abbr_dispose(out)).strip()
