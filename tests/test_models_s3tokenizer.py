"""vq06 path (engine/models/s3tokenizer.py): ONNX initializers -> native S3 v1 module, codes
against onnxruntime and an eager reference, batching (SemanticTokenizer), converted-weight cache,
bad files; the head count (v1's head dim 64) on a torch.onnx.export graph and on head splits the
graph's reshapes state."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stepvox.engine.errors import CheckpointError, MissingTensorsError
from stepvox.engine.frontend.whisper_mel import whisper_log_mel
from stepvox.engine.models.onnx_weights import read_onnx_weights
from stepvox.engine.models.s3tokenizer import (CACHE_SUFFIX, HEAD_DIM, S3Tokenizer, SemanticTokenizer,
                                               load_s3_tokenizer, s3_tensors_from_onnx, split_pieces)
from stepvox.engine.models.weights import load_strict
from stepvox.testing.speech import espeak_wav
from stepvox.testing.tokenizer import TINY, build_s3_onnx, s3_tensors

from stepvox.testing.official_tokenizer import s3_codes_reference, whisper_log_mel_reference


def _speechy(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    return 0.3 * torch.sin(2 * np.pi * 180 * t * (1 + 0.2 * torch.sin(2 * t))) + 0.03 * torch.randn(n, generator=g)


@pytest.fixture(scope="module", params=[True, False], ids=["fused-ln", "decomposed-ln"])
def s3(request, tmp_path_factory, reference_kernels):
    path = str(tmp_path_factory.mktemp("s3") / "speech_tokenizer_v1.onnx")
    sd = s3_tensors(TINY, 11)
    build_s3_onnx(path, sd, TINY.s_heads, fused_layer_norm=request.param)
    return path, sd, load_s3_tokenizer(path, cache=False, kernels=reference_kernels)


def _codes(model, wavs, **kwargs) -> list[torch.Tensor]:
    """Codes per piece through SemanticTokenizer (eager), from the pieces' Whisper mels."""
    return SemanticTokenizer(model, use_cuda_graphs=False).launch([whisper_log_mel(w, 128) for w in wavs],
                                                                  **kwargs)[0]


def test_conversion_names_shapes_and_transposes(s3):
    path, sd, model = s3
    cfg, tensors = s3_tensors_from_onnx(read_onnx_weights(path))
    assert (cfg.n_state, cfg.n_head, cfg.n_layer, cfg.codebook_size, cfg.conv1_stride) == \
        (TINY.s_state, TINY.s_heads, TINY.s_layers, TINY.vq06_codes, 2)
    assert set(tensors) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(tensors[k], v, msg=k)       # (in, out) ONNX matmuls come back (out, in)
    # the released layout: named convs / positions, anonymous matmul weights known by their node
    w = read_onnx_weights(path)
    assert "encoders.conv1.weight" in w.initializers
    q = w.consumed_by("/blocks.0/attn/query/MatMul", 1)
    assert q and q[0].startswith("onnx::") and w.initializers[q[0]].shape == (TINY.s_state, TINY.s_state)
    assert not w.consumed_by("/blocks.0/attn/key/Add")
    assert w.initializers[w.consumed_by("/quantizer/rq/model/layers.0/_codebook/MatMul", 1)[0]].shape == \
        (TINY.s_state, TINY.vq06_codes)


@pytest.mark.parametrize("n", [16000 * 2 + 77, 5000])
def test_codes_match_onnxruntime_and_eager_reference(s3, n):
    path, sd, model = s3
    wav = _speechy(n, n)
    mel = whisper_log_mel(wav)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ort_codes = sess.run(None, {names[0]: mel[None].numpy(), names[1]: np.array([mel.shape[1]], np.int32)})[0]
    codes = _codes(model, [wav])[0].tolist()
    assert codes == ort_codes[0].tolist()
    assert codes == s3_codes_reference(whisper_log_mel_reference(wav), sd, TINY.s_heads)
    assert abs(len(codes) - n / 16000 * 25) <= 2          # the official sanity check


def test_batched_pieces_equal_unbatched(s3):
    _, _, model = s3
    pieces = [_speechy(n, n) for n in (480, 3000, 16000 + 5, 40000)]
    batched = _codes(model, pieces)
    single = [_codes(model, [p])[0] for p in pieces]
    tiny_batches = _codes(model, pieces, max_batch_frames=300)
    for b, s, t in zip(batched, single, tiny_batches):
        assert b.tolist() == s.tolist() == t.tolist()


def test_split_pieces_follows_step_audio():
    wav = torch.zeros(480000 * 2 + 479)
    assert [p.numel() for p in split_pieces(wav)] == [480000, 480000]
    assert [p.numel() for p in split_pieces(torch.zeros(480000 + 480))] == [480000, 480]
    assert split_pieces(torch.zeros(100)) == []


def test_safetensors_cache_is_used_and_invalidated(tmp_path):
    path = str(tmp_path / "speech_tokenizer_v1.onnx")
    sd = s3_tensors(TINY, 1)
    build_s3_onnx(path, sd, TINY.s_heads)
    load_s3_tokenizer(path)
    assert os.path.exists(path + CACHE_SUFFIX)
    # a cache with other weights (same size/mtime as recorded) is what gets used
    with safe_open(path + CACHE_SUFFIX, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["encoder.conv1.bias"] = tensors["encoder.conv1.bias"] + 1
    save_file(tensors, path + CACHE_SUFFIX, metadata=meta)
    torch.testing.assert_close(load_s3_tokenizer(path).encoder.conv1.bias, sd["encoder.conv1.bias"] + 1)
    # rewriting the ONNX file invalidates the cache
    sd2 = s3_tensors(TINY, 2)
    build_s3_onnx(path, sd2, TINY.s_heads)
    os.utime(path, ns=(1, 1))
    torch.testing.assert_close(load_s3_tokenizer(path).encoder.conv1.bias, sd2["encoder.conv1.bias"])


def test_bad_onnx_files_are_named(tmp_path):
    path = str(tmp_path / "s3.onnx")
    sd = s3_tensors(TINY, 1)
    build_s3_onnx(path, sd, TINY.s_heads)
    model = onnx.load(path)
    # an initializer the S3 v1 layout does not know
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "mystery.weight"))
    model.graph.node.append(onnx.helper.make_node("Identity", ["mystery.weight"], ["m_out"], name="/mystery/Id"))
    onnx.save(model, path)
    with pytest.raises(CheckpointError, match="mystery.weight"):
        load_s3_tokenizer(path, cache=False)
    # a missing tensor
    model = onnx.load(path)
    keep = [i for i in model.graph.initializer if i.name not in ("mystery.weight", "encoders.blocks.1.mlp_ln.bias")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.node.remove([n for n in model.graph.node if n.name == "/mystery/Id"][0])
    onnx.save(model, path)
    with pytest.raises(MissingTensorsError, match="blocks.1.mlp_ln.bias"):
        load_s3_tokenizer(path, cache=False)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="cannot read ONNX file"):
        load_s3_tokenizer(str(tmp_path / "junk.onnx"), cache=False)


def test_stale_cache_with_a_graph_constant_head_count_is_rebuilt(tmp_path):
    path = str(tmp_path / "speech_tokenizer_v1.onnx")
    build_s3_onnx(path, s3_tensors(TINY, 1), TINY.s_heads)
    load_s3_tokenizer(path)
    with safe_open(path + CACHE_SUFFIX, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path + CACHE_SUFFIX, metadata={**meta, "n_head": "1"})   # what the old loader cached
    assert load_s3_tokenizer(path).cfg.n_head == TINY.s_heads


# ------------------------------------------------------------------ head count (v1: head dim 64)
class _Attention(torch.nn.Module):
    """Whisper's attention as S3 v1 has it: key without bias, q and k each scaled by dh^-0.25."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.25
        self.query, self.key = torch.nn.Linear(d, d), torch.nn.Linear(d, d, bias=False)
        self.value, self.out = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        q = q.view(*q.shape[:2], self.heads, -1).permute(0, 2, 1, 3) * self.scale
        k = k.view(*k.shape[:2], self.heads, -1).permute(0, 2, 3, 1) * self.scale
        v = v.view(*v.shape[:2], self.heads, -1).permute(0, 2, 1, 3)
        w = torch.softmax(q @ k, dim=-1)
        return self.out((w @ v).permute(0, 2, 1, 3).flatten(start_dim=2))


class _Block(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn_ln, self.attn, self.mlp_ln = torch.nn.LayerNorm(d), _Attention(d, heads), torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class _Codebook(torch.nn.Module):
    def __init__(self, k, d):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(k, d) / math.sqrt(d))

    def forward(self, x):
        e = self.embed.t()
        dist = -(x.pow(2).sum(-1, keepdim=True) - 2 * x @ e + e.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices


class _Nest(torch.nn.Module):
    """One level of the quantizer's module path; calling through it gives the node names scope."""

    def __init__(self, name, inner):
        super().__init__()
        self.name = name
        self.add_module(name, inner)

    def forward(self, x):
        return getattr(self, self.name)(x)


class _Layers(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.layers = torch.nn.ModuleList([inner])

    def forward(self, x):
        return self.layers[0](x)


class _WhisperS3(torch.nn.Module):
    """An S3 v1-shaped Whisper encoder + codebook, attributes named as the released graph's scopes
    (/conv1, /blocks.{i}/attn/query, /quantizer/rq/model/layers.0/_codebook)."""

    def __init__(self, d, heads, layers, mels=TINY.s_mels, ctx=TINY.s_ctx, codes=TINY.vq06_codes):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(mels, d, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.positional_embedding = torch.nn.Parameter(torch.randn(ctx, d) * 0.5)
        self.blocks = torch.nn.ModuleList([_Block(d, heads) for _ in range(layers)])
        self.quantizer = _Nest("rq", _Nest("model", _Layers(_Nest("_codebook", _Codebook(codes, d)))))
        with torch.no_grad():          # LayerNorms off their 1/0 init: equal initializers would be merged
            for name, p in self.named_parameters():
                if "_ln." in name:
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, feats):
        x = torch.nn.functional.gelu(self.conv1(feats))
        x = torch.nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.quantizer(torch.nn.functional.normalize(x, p=2.0, dim=-1))


def _export(path, d, heads, layers=2, seed=0) -> _WhisperS3:
    torch.manual_seed(seed)
    module = _WhisperS3(d, heads, layers).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # the TorchScript exporter is deprecated, still there
        torch.onnx.export(module, (torch.randn(1, TINY.s_mels, 200),), path, dynamo=False, opset_version=14,
                          input_names=["feats"], output_names=["codes"],
                          dynamic_axes={"feats": {0: "B", 2: "T"}, "codes": {0: "B", 1: "T_out"}})
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("s3-export") / "speech_tokenizer_v1.onnx")
    return path, _export(path, 128, 2)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> torch.Tensor:
    wav, sr = espeak_wav(str(tmp_path_factory.mktemp("s3-speech") / "speech.wav"), "the quick brown fox", rate=16000)
    assert sr == 16000
    return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))


def test_torch_onnx_export_loads_v1_heads_and_matches_onnxruntime(exported, speech_wav, reference_kernels):
    path, module = exported
    w = read_onnx_weights(path)
    # the exporter's /blocks.0/attn/Constant_1 is a Gather index (the view's dim 1), not a head count
    assert int(np.ravel(w.node_attributes["/blocks.0/attn/Constant_1"]["value"])[0]) == 1
    model = load_s3_tokenizer(path, cache=False, kernels=reference_kernels)
    assert (model.cfg.n_state, model.cfg.n_head, model.cfg.n_layer) == (128, 2, 2)
    assert model.cfg.n_state // model.cfg.n_head == HEAD_DIM
    # every exported tensor lands on its torch name (the exporter's bare names and anonymous matmuls)
    sd = module.state_dict()
    expected = {("quantizer._codebook.embed" if k.endswith("_codebook.embed") else "encoder." + k): v
                for k, v in sd.items()}
    for k, v in expected.items():
        torch.testing.assert_close(model.state_dict()[k].float(), v, msg=k)

    mel = whisper_log_mel(speech_wav, 128)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ort_codes = sess.run(None, {"feats": mel[None].numpy()})[0][0].tolist()
    codes = _codes(model, [speech_wav])[0].tolist()
    assert len(codes) == len(ort_codes) > 20
    assert codes == ort_codes
    # one head of 128 (what the graph constant used to give) is a different tokenizer
    one_head = S3Tokenizer(dataclasses.replace(model.cfg, n_head=1), reference_kernels)
    load_strict(one_head, {k: v.clone() for k, v in model.state_dict().items()}, path)
    assert _codes(one_head.eval(), [speech_wav])[0].tolist() != ort_codes


def test_head_split_other_than_v1_is_refused(tmp_path):
    path = str(tmp_path / "s3.onnx")
    build_s3_onnx(path, s3_tensors(TINY, 3), 4)                      # n_state 128 as 4 heads x 32
    with pytest.raises(CheckpointError, match=r"4 heads x 32 dims.*requires 2 heads x 64 dims"):
        load_s3_tokenizer(path, cache=False)
    # the exporter's split (B, T, 4, -1): the head dim is inferred from n_state
    _export(path, 128, 4, layers=1)
    with pytest.raises(CheckpointError, match=r"4 heads x 32 \(inferred\) dims.*requires 2 heads x 64 dims"):
        load_s3_tokenizer(path, cache=False)
    build_s3_onnx(path, s3_tensors(dataclasses.replace(TINY, s_state=96), 3), 2)
    with pytest.raises(CheckpointError, match=r"n_state 96, not a multiple of the S3 v1 head dim 64"):
        load_s3_tokenizer(path, cache=False)


def test_graph_constant_no_longer_sets_heads(tmp_path, reference_kernels):
    """Constant_1 = 1 (as in a torch export) with reshapes that fold to nothing: the v1 head count."""
    path = str(tmp_path / "s3.onnx")
    sd = s3_tensors(TINY, 4)
    build_s3_onnx(path, sd, TINY.s_heads)
    graph = onnx.load(path)
    for node in graph.graph.node:
        if node.name == "/blocks.0/attn/Constant_1":
            node.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.array(1, np.int64)))
        if node.op_type == "Reshape" and node.input[1].endswith("/attn/Concat_output_0"):
            node.input[1] = "split_shape"                               # known at run time only
    graph.graph.input.append(onnx.helper.make_tensor_value_info("split_shape", onnx.TensorProto.INT64, [4]))
    onnx.save(graph, path)
    model = load_s3_tokenizer(path, cache=False, kernels=reference_kernels)
    assert model.cfg.n_head == TINY.s_heads == TINY.s_state // HEAD_DIM
    wav = _speechy(16000, 9)
    mel = whisper_log_mel(wav)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ort_codes = sess.run(None, {"feats": mel[None].numpy(), "feats_length": np.array([mel.shape[1]], np.int32),
                                "split_shape": np.array([0, -1, TINY.s_heads, HEAD_DIM], np.int64)})[0]
    assert _codes(model, [wav])[0].tolist() == ort_codes[0].tolist()
