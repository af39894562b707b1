"""vq06 path: ONNX initializers -> native S3 v1 module, Whisper log-mel, codes against
onnxruntime and an eager reference, batching, converted-weight cache, bad files."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import stepvox.kernels as K
from stepvox.engine.audio.tokenizer_errors import TokenizerCheckpointError
from stepvox.engine.audio.tokenizer_whisper_mel import whisper_log_mel
from stepvox.engine.models.s3tokenizer import (CACHE_SUFFIX, load_s3_tokenizer, s3_tensors_from_onnx,
                                               split_pieces)
from stepvox.engine.onnx_weights import read_onnx_weights

from fixtures_tokenizer import TINY, build_s3_onnx, s3_codes_reference, s3_tensors, slaney_mel_matrix, \
    whisper_log_mel_reference


def _speechy(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    return 0.3 * torch.sin(2 * np.pi * 180 * t * (1 + 0.2 * torch.sin(2 * t))) + 0.03 * torch.randn(n, generator=g)


@pytest.fixture(scope="module", params=[True, False], ids=["fused-ln", "decomposed-ln"])
def s3(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("s3") / "speech_tokenizer_v1.onnx")
    sd = s3_tensors(TINY, 11)
    build_s3_onnx(path, sd, TINY.s_heads, fused_layer_norm=request.param)
    return path, sd, load_s3_tokenizer(path, cache=False)


def test_mel_matrix_matches_librosa_formula():
    from stepvox.engine.audio.tokenizer_whisper_mel import _mel_matrix
    ours = _mel_matrix(128, "cpu").numpy()
    ref = slaney_mel_matrix()
    assert np.abs(ours - ref).max() < 5e-7 and np.abs(ref).max() > 0.01


def test_whisper_log_mel_matches_reference():
    wav = _speechy(16000 + 123, 0)
    mel = whisper_log_mel(wav)
    assert mel.shape == (128, (16000 + 123) // 160)
    torch.testing.assert_close(mel, whisper_log_mel_reference(wav), atol=2e-5, rtol=1e-5)


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
    with K.use_backend("reference"):
        codes = model.tokenize_pieces([wav])[0].tolist()
    assert codes == ort_codes[0].tolist()
    assert codes == s3_codes_reference(whisper_log_mel_reference(wav), sd, TINY.s_heads)
    assert abs(len(codes) - n / 16000 * 25) <= 2          # the official sanity check


def test_batched_pieces_equal_unbatched(s3):
    _, _, model = s3
    pieces = [_speechy(n, n) for n in (480, 3000, 16000 + 5, 40000)]
    with K.use_backend("reference"):
        batched = model.tokenize_pieces(pieces)
        single = [model.tokenize_pieces([p])[0] for p in pieces]
        tiny_batches = model.tokenize_pieces(pieces, max_batch_frames=300)
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
    from safetensors import safe_open
    from safetensors.torch import save_file
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
    with pytest.raises(TokenizerCheckpointError, match="mystery.weight"):
        load_s3_tokenizer(path, cache=False)
    # a missing tensor
    model = onnx.load(path)
    keep = [i for i in model.graph.initializer if i.name not in ("mystery.weight", "encoders.blocks.1.mlp_ln.bias")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.node.remove([n for n in model.graph.node if n.name == "/mystery/Id"][0])
    onnx.save(model, path)
    with pytest.raises(TokenizerCheckpointError, match="blocks.1.mlp_ln.bias"):
        load_s3_tokenizer(path, cache=False)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(TokenizerCheckpointError):
        load_s3_tokenizer(str(tmp_path / "junk.onnx"), cache=False)
