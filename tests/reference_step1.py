"""An independent eager Step1 (SPEC.md §2.2) for the engine tests: full recompute every token,
float32, straight from the safetensors files, nothing shared with stepvox's model code."""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file


class ReferenceStep1:
    def __init__(self, folder: str):
        with open(os.path.join(folder, "config.json")) as f:
            self.cfg = json.load(f)
        index = os.path.join(folder, "model.safetensors.index.json")
        files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
                 else ["model.safetensors"])
        self.w = {}
        for name in files:
            self.w.update({k: v.float() for k, v in load_file(os.path.join(folder, name)).items()})
        heads = self.cfg["num_attention_heads"]
        n = 2 ** math.floor(math.log2(heads))
        slopes = [2 ** (-8 / n * k) for k in range(1, n + 1)]
        slopes += [2 ** (-4 / n * k) for k in range(1, 2 * (heads - n), 2)]
        self.slopes = torch.tensor(slopes, dtype=torch.float32)

    def _norm(self, x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.cfg["rms_norm_eps"]) * w

    def logits(self, ids: list[int]) -> torch.Tensor:
        c, w = self.cfg, self.w
        h, heads, groups = c["hidden_size"], c["num_attention_heads"], c["num_attention_groups"]
        d = h // heads
        t = len(ids)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        pos = torch.arange(t, dtype=torch.float32)
        dist = pos[:, None] - pos[None, :]
        bias = -self.slopes[:, None, None] * dist.clamp(min=0).sqrt()
        bias = bias.masked_fill(dist < 0, float("-inf"))
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            n = self._norm(x, w[p + "input_layernorm.weight"])
            q = (n @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, d).transpose(0, 1)
            k = (n @ w[p + "self_attn.k_proj.weight"].T).view(t, groups, d).transpose(0, 1)
            v = (n @ w[p + "self_attn.v_proj.weight"].T).view(t, groups, d).transpose(0, 1)
            k = k.repeat_interleave(heads // groups, 0)
            v = v.repeat_interleave(heads // groups, 0)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + bias, -1) @ v
            x = x + att.transpose(0, 1).reshape(t, h) @ w[p + "self_attn.o_proj.weight"].T
            n = self._norm(x, w[p + "post_attention_layernorm.weight"])
            gate = n @ w[p + "mlp.gate_proj.weight"].T
            up = n @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        x = self._norm(x, w["model.norm.weight"])
        return x[-1] @ w["lm_head.weight"].T

    def greedy(self, ids: list[int], max_tokens: int, stop: int | None = None) -> list[int]:
        ids = list(ids)
        out = []
        for _ in range(max_tokens):
            tok = int(self.logits(ids).argmax())
            out.append(tok)
            ids.append(tok)
            if tok == stop:
                break
        return out
