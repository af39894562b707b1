"""Write random-weight Step1 folders in the released format (for tests, demos and benchmarks).

The folder has what a release has: config.json with the released keys, safetensors shards named
model-0000N.safetensors with model.safetensors.index.json (or one model.safetensors), the
separate lm_head, and a SentencePiece tokenizer.model whose ids follow SPEC.md §7.1 (control
pieces 0-4, text pieces, then <audio_0..5119> at 65536+). Nothing here is needed to serve a real model.
"""
from __future__ import annotations

import io
import json
import os

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as pb

from stepvox.engine import special_tokens as st
from stepvox.engine.config import TINY, Step1Config
from stepvox.engine.models.step1_checkpoint import INDEX_FILE, SINGLE_FILE, expected_shapes

_CORPUS = """The quick brown fox jumps over the lazy dog. Speech turns into tokens and back into speech.
A voice dialogue system listens, thinks and answers in real time. Hello world, how are you today?
Step Audio reads text and audio tokens alike. Numbers one two three four five six seven eight nine ten.
你好，世界。今天天气很好。我们一起说话吧。""" * 8


def config_dict(**overrides) -> dict:
    cfg = dict(TINY)
    cfg.update(overrides)
    return {"architectures": ["Step1ForCausalLM"], "model_type": "step1", "bos_token_id": st.BOS_ID,
            "eos_token_id": st.EOT_ID, "pad_token_id": st.PAD_ID, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
            **cfg}


def random_weights(cfg: Step1Config, seed: int = 0, dtype=torch.bfloat16,
                   audio_head_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Weights scaled so that a tiny model's activations and logits stay well spread (clear argmax).
    `audio_head_scale` > 1 scales the LM-head rows of the speech tokens, so that a model meant to
    stand in for the TTS model mostly emits speech tokens (as the trained one does)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            t = torch.randn(shape, generator=gen) * (3.0 / shape[1] ** 0.5)
            t[st.AUDIO_TOKEN_OFFSET:st.AUDIO_TOKENS_END] *= audio_head_scale
        else:
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        out[name] = t.to(dtype)
    return out


def build_tokenizer_model(path: str, vocab_size: int = 74752) -> None:
    """A SentencePiece model trained on a small corpus, then laid out like Step1's vocabulary.

    Normalised like the release (Llama style): identity rule, whitespace kept as it is, a dummy
    prefix, byte fallback, so spaces, tabs and newlines reach the pieces (a newline becomes <0x0A>)."""
    trained = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS.splitlines()), model_writer=trained,
                                   vocab_size=340, model_type="unigram", byte_fallback=True, hard_vocab_limit=False,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, user_defined_symbols=["<|EOT|>", "<|BOT|>"], minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(trained.getvalue())
    assert proto.pieces[3].piece == "<|EOT|>" and proto.pieces[4].piece == "<|BOT|>"
    n = len(proto.pieces)
    for i in range(n, st.AUDIO_TOKEN_OFFSET):
        proto.pieces.add(piece=f"<unused_{i}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
    for k in range(st.VQ02_CODES + st.VQ06_CODES):
        proto.pieces.add(piece=st.audio_token_str(k), score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    for i in range(len(proto.pieces), vocab_size):
        proto.pieces.add(piece=f"<unused_{i}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())


def write_random_step1(folder: str, seed: int = 0, num_shards: int = 2, dtype=torch.bfloat16,
                       tokenizer: bool = True, audio_head_scale: float = 1.0, **config_overrides) -> str:
    """Write a released-format Step1 folder with random weights; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    raw = config_dict(**config_overrides)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    cfg = Step1Config.from_dict(raw)
    weights = random_weights(cfg, seed, dtype, audio_head_scale)
    if num_shards <= 1:
        save_file(weights, os.path.join(folder, SINGLE_FILE), metadata={"format": "pt"})
    else:
        names = list(weights)
        per = -(-len(names) // num_shards)
        weight_map, total = {}, 0
        for s in range(num_shards):
            shard = f"model-{s + 1:05d}.safetensors"
            part = {n: weights[n] for n in names[s * per:(s + 1) * per]}
            if not part:
                continue
            save_file(part, os.path.join(folder, shard), metadata={"format": "pt"})
            for n, t in part.items():
                weight_map[n] = shard
                total += t.numel() * t.element_size()
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer:
        write_tokenizer(folder, cfg.vocab_size, cfg.max_seq_len)
    return folder


def write_tokenizer(folder: str, vocab_size: int = 74752, model_max_length: int = 4096) -> str:
    """tokenizer.model and the released tokenizer_config.json (no add_bos_token key: True by
    default), the two files `AutoTokenizer.from_pretrained` reads; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    build_tokenizer_model(os.path.join(folder, "tokenizer.model"), vocab_size)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "pad_token": "<unk>", "legacy": False,
                   "model_max_length": model_max_length}, f, indent=2)
    return folder
