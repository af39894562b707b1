"""Step1 decoder (the 3B TTS and the 130B chat model share it; SPEC.md §2).

Pre-norm blocks with sqrt-ALiBi attention and a SwiGLU MLP; q/k/v and gate/up are fused at load
time; the LM head is its own tensor (never tied to the embedding).
"""
from __future__ import annotations

import torch
from torch import nn

from stepvox.kernels import silu_and_mul

from ..attention_metadata import AttentionMetadata
from ..checkpoint import CheckpointReader
from ..config import Step1Config
from ..layers.attention import Step1Attention
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import ColumnParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm


class Step1MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype, device):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter], dtype, device, names=("gate_proj", "up_proj"))
        self.down_proj = RowParallelLinear(inter, hidden, dtype, device, name="down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class Step1DecoderLayer(nn.Module):
    def __init__(self, cfg: Step1Config, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Step1Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_attention_groups,
                                        dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = Step1MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device)

    def forward(self, hidden, residual, meta: AttentionMetadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Step1ForCausalLM(nn.Module):
    def __init__(self, cfg: Step1Config, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(Step1DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step's tokens."""
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits, float32."""
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def compute_logits_raw(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits in the model dtype (what the LM head produces; float32 adds nothing
        but a cast, so the decode graph's argmax reads these)."""
        return self.lm_head(hidden)

    def attention_layers(self):
        return [layer.self_attn.attn for layer in self.layers]

    # ---------------------------------------------------------------- loading
    def checkpoint_targets(self):
        """checkpoint tensor name -> (module that loads it, shard index within that module)."""
        targets = {"model.embed_tokens.weight": (self.embed_tokens, 0), "model.norm.weight": (self.norm, 0),
                   "lm_head.weight": (self.lm_head, 0)}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            targets.update({
                p + "input_layernorm.weight": (layer.input_layernorm, 0),
                p + "post_attention_layernorm.weight": (layer.post_attention_layernorm, 0),
                p + "self_attn.q_proj.weight": (attn.qkv_proj, 0),
                p + "self_attn.k_proj.weight": (attn.qkv_proj, 1),
                p + "self_attn.v_proj.weight": (attn.qkv_proj, 2),
                p + "self_attn.o_proj.weight": (attn.o_proj, 0),
                p + "mlp.gate_proj.weight": (mlp.gate_up_proj, 0),
                p + "mlp.up_proj.weight": (mlp.gate_up_proj, 1),
                p + "mlp.down_proj.weight": (mlp.down_proj, 0),
            })
        return targets

    @torch.inference_mode()
    def load_weights(self, reader: CheckpointReader, progress=None) -> None:
        targets = self.checkpoint_targets()
        for n, (name, (module, shard)) in enumerate(targets.items()):
            module.load_shard(reader.get(name), shard)
            if progress is not None:
                progress(n + 1, len(targets))
