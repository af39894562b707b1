"""Step1 decoder (the 3B TTS and the 130B chat model share it; SPEC.md §2).

Pre-norm blocks with sqrt-ALiBi attention and a SwiGLU MLP; q/k/v and gate/up are fused at load
time; the LM head is its own tensor (never tied to the embedding).

After loading, `fold_norm_weights` multiplies each layer's two RMSNorm weights into the columns of
the product that reads the norm (q|k|v, gate|up). The function is unchanged; what it buys is the
fused decode step: on one GPU, a step of at most 16 tokens keeps the residual stream in one
buffer, the products that end a sub-block add themselves to it, and the products that start one
normalise in their epilogue (kernels/gemv.py), so a layer is 5 launches instead of 8.

With FP8 weights (kernels/fp8.py) the linear layers hold float8_e4m3fn rows with float32 scales;
their norms stay unfolded and the fused step's kernels multiply the input by the norm weight.
"""
from __future__ import annotations

import torch
from torch import nn

from stepvox.kernels import (KernelConfig, embedding_sumsq, linear_small_m_add_, rms_linear_small_m, silu_and_mul,
                             use_triton)
from stepvox.kernels.gemv import MAX_M as FUSED_MAX_TOKENS

from ..attention_metadata import AttentionMetadata
from ..config import Step1Config
from ..distributed.parallel_state import TPGroup
from ..layers.attention import Step1Attention
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import ColumnParallelLinear, Matmul, RowParallelLinear
from ..layers.norm import RMSNorm
from .step1_checkpoint import SCALE_SUFFIX, CheckpointReader


class Step1MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype, device, tp: TPGroup, kernels: KernelConfig, matmul: Matmul,
                 fp8: bool = False):
        super().__init__()
        self.kernels = kernels
        self.matmul = matmul
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter], dtype, device, tp, matmul,
                                                 names=("gate_proj", "up_proj"), fp8=fp8)
        self.down_proj = RowParallelLinear(inter, hidden, dtype, device, tp, matmul, name="down_proj", fp8=fp8)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        k = self.kernels
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), backend=k.backend, pdl=k.pdl), reduce)

    def forward_fused(self, residual: torch.Tensor, sumsq: torch.Tensor, eps: float,
                      norm_weight: torch.Tensor | None = None) -> torch.Tensor:
        """residual += MLP(RMSNorm(residual)) in two launches; returns the new rows' sums of squares.
        `norm_weight`: the norm's weight when it is not folded into gate|up (FP8 weights)."""
        k, gate_up, down = self.kernels, self.gate_up_proj, self.down_proj
        act = rms_linear_small_m(residual, gate_up.weight, sumsq, eps, silu_and_mul=True,
                                 config=self.matmul.tiles(gate_up.weight), scale=gate_up.weight_scale,
                                 norm_weight=norm_weight, backend=k.backend, pdl=k.pdl)
        return linear_small_m_add_(act, down.weight, residual, config=self.matmul.tiles(down.weight),
                                   scale=down.weight_scale, backend=k.backend, pdl=k.pdl)


class Step1DecoderLayer(nn.Module):
    def __init__(self, cfg: Step1Config, dtype, device, tp: TPGroup, kernels: KernelConfig, matmul: Matmul,
                 fp8: bool = False):
        super().__init__()
        self.kernels = kernels
        self.matmul = matmul
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, kernels)
        self.self_attn = Step1Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_attention_groups,
                                        dtype, device, tp, kernels, matmul, fp8)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, kernels)
        self.mlp = Step1MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device, tp, kernels, matmul, fp8)

    def forward(self, hidden, residual, meta: AttentionMetadata, tp_fused: TPGroup | None = None):
        """tp_fused: the row-parallel products (o_proj, down_proj) leave their partial sums to the
        norm after them, which all-reduces, adds and normalises in one kernel (TPGroup's
        all_reduce_add_rms_norm); `hidden` is then the previous layer's partial sum."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        elif tp_fused is not None:
            hidden, residual = self.input_layernorm.reduce_add(hidden, residual, tp_fused)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, meta, reduce=tp_fused is None)
        if tp_fused is not None:
            hidden, residual = self.post_attention_layernorm.reduce_add(hidden, residual, tp_fused)
        else:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, reduce=tp_fused is None), residual

    def forward_fused(self, residual: torch.Tensor, sumsq: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The layer on the fused decode path (norm weights folded): `residual` is updated in place;
        returns the sums of squares of its new rows for the next layer's first product."""
        attn, k, tiles = self.self_attn, self.kernels, self.matmul.tiles
        qkv_proj, o_proj = attn.qkv_proj, attn.o_proj
        # FP8 weights keep their norms unfolded (a fold would change their row scales): the kernels
        # apply the norm weights to the input instead
        fp8 = qkv_proj.weight_scale is not None
        qkv = rms_linear_small_m(residual, qkv_proj.weight, sumsq, self.input_layernorm.eps,
                                 config=tiles(qkv_proj.weight), scale=qkv_proj.weight_scale,
                                 norm_weight=self.input_layernorm.weight if fp8 else None, backend=k.backend,
                                 pdl=k.pdl)
        sumsq = linear_small_m_add_(attn.attend(qkv, meta), o_proj.weight, residual, config=tiles(o_proj.weight),
                                    scale=o_proj.weight_scale, backend=k.backend, pdl=k.pdl)
        return self.mlp.forward_fused(residual, sumsq, self.post_attention_layernorm.eps,
                                      self.post_attention_layernorm.weight if fp8 else None)


class Step1ForCausalLM(nn.Module):
    def __init__(self, cfg: Step1Config, dtype: torch.dtype, device: torch.device, tp: TPGroup = TPGroup(),
                 kernels: KernelConfig = KernelConfig(), fused_decode: bool = True, gemv_max_rows: int = 16,
                 gemv_tiles=None, fp8: bool = False, fp8_lm_head: bool = False):
        """tp: this rank's tensor-parallel group; kernels: how its kernels run; fused_decode: steps of
        at most 16 tokens on one GPU run the fused layer (False: always the unfused one, for
        comparisons); gemv_max_rows: products of up to this many rows take the GEMV kernel on GPUs;
        gemv_tiles: (N, K) -> a GEMV product's tile config, or None for the kernel's choice;
        fp8: the layers' linear weights in FP8 with per-output-channel scales (kernels/fp8.py;
        embedding and norms stay in `dtype`), fp8_lm_head: the LM head's too. FP8 layers keep their
        norms unfolded; the fused step applies them in its kernels."""
        super().__init__()
        self.cfg = cfg
        self.tp_size = tp.size
        self.tp = tp
        self.kernels = kernels
        self.fp8 = fp8
        self.fused_decode = fused_decode
        self.norm_weights_folded = False
        matmul = Matmul(kernels, gemv_max_rows, gemv_tiles)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, tp)
        self.layers = nn.ModuleList(Step1DecoderLayer(cfg, dtype, device, tp, kernels, matmul, fp8)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, kernels)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, device, tp, matmul, fp8=fp8_lm_head)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step's tokens."""
        if self.fused_step(input_ids):
            residual, sumsq = embedding_sumsq(input_ids, self.embed_tokens.weight, backend=self.kernels.backend,
                                              pdl=self.kernels.pdl)
            for layer in self.layers:
                sumsq = layer.forward_fused(residual, sumsq, meta)
            return self.norm(residual)
        hidden = self.embed_tokens(input_ids)
        # every rank decides alike: the choice depends on the step's shape only
        tp_fused = self.tp if self.tp.fuses_add_rms_norm(hidden) else None
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, meta, tp_fused)
        if tp_fused is not None:
            return self.norm.reduce_add(hidden, residual, tp_fused)[0]
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def fused_step(self, input_ids: torch.Tensor) -> bool:
        """Whether a step of these tokens runs the fused decode path: one GPU (the row-parallel
        products of tensor parallelism must all-reduce before the residual add), norm weights
        folded (or FP8 weights, whose kernels apply the norms), at most 16 tokens, Triton kernels."""
        return (self.fused_decode and (self.norm_weights_folded or self.fp8) and self.tp_size == 1
                and 0 < input_ids.shape[0] <= FUSED_MAX_TOKENS and use_triton(input_ids, self.kernels.backend))

    @torch.inference_mode()
    def fold_norm_weights(self) -> None:
        """Multiply each layer's RMSNorm weights into the columns of the product after it and set the
        norms to 1 (same function; rounded once to the weight dtype). Idempotent. FP8 weights are
        left as they are (their scales are per output row; the fused step does not run them)."""
        if self.norm_weights_folded or self.fp8:
            return
        for layer in self.layers:
            for norm, linear in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                                 (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
                w = linear.weight
                w.copy_((w.float() * norm.weight.float()[None, :]).to(w.dtype))
                norm.weight.fill_(1.0)
        self.norm_weights_folded = True

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
        """Each checkpoint tensor into its module: as stored, or quantized on the way into an FP8
        layer (one tensor at a time); an FP8 checkpoint's tensors come with their scales."""
        targets = self.checkpoint_targets()
        for n, (name, (module, shard)) in enumerate(targets.items()):
            scale = reader.get(name + SCALE_SUFFIX) if reader.has(name + SCALE_SUFFIX) else None
            if scale is None:
                module.load_shard(reader.get(name), shard)
            else:
                module.load_shard(reader.get(name), shard, scale=scale)
            if progress is not None:
                progress(n + 1, len(targets))
