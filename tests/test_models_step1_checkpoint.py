"""Step1 folders that are broken in the ways a download or a hand edit breaks them give
CheckpointError naming the file (engine/models/step1_checkpoint.py, engine/tokenizer.py): a
truncated model.safetensors, an index whose weight_map is a list or holds non-names, shards the
index names but the folder lacks, a tokenizer.model that is not SentencePiece (issue 14, item 6;
several of these were untyped safetensors / AttributeError / TypeError errors)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from stepvox.engine.config import Step1Config
from stepvox.engine.errors import CheckpointError, InvalidRequestError, MissingTensorsError
from stepvox.engine.models.step1_checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader
from stepvox.engine.tokenizer import Step1Tokenizer
from stepvox.llm import LLM


@pytest.fixture()
def sharded(tmp_path, tiny_model):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.fixture()
def single(tmp_path, tiny_model_single_file):
    folder = tmp_path / "single"
    shutil.copytree(tiny_model_single_file, folder)
    return folder


def _reader(folder):
    return CheckpointReader(str(folder), Step1Config.from_folder(str(folder)))


def test_intact_folders_read(sharded, single):
    for folder in (sharded, single):
        with _reader(folder) as reader:
            assert reader.get("model.norm.weight").get_shape() == [Step1Config.from_folder(str(folder)).hidden_size]


@pytest.mark.parametrize("keep", [0.5, 0.999, 100, 5, 0])
def test_truncated_single_file(single, keep):
    path = single / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=rf"{path}: not a readable safetensors file \("):
        _reader(single)


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{shard}: not a readable safetensors file"):
        _reader(sharded)


@pytest.mark.parametrize("index, says", [
    ({"weight_map": ["model-00001.safetensors"]}, "expected an object with a weight_map object .* found "
                                                  r"\['model-00001.safetensors'\]"),
    ({"weight_map": None}, "expected an object with a weight_map object .* found None"),
    ({"metadata": {}}, "expected an object with a weight_map object .* found None"),
    ([1, 2], r"expected an object with a weight_map object .* found \[1, 2\]"),
    ({"weight_map": {"model.norm.weight": 3}}, r"weight_map\['model.norm.weight'\] must name a shard file in the "
                                               "folder, got 3"),
    ({"weight_map": {"model.norm.weight": None}}, "must name a shard file in the folder, got None"),
    ({"weight_map": {"model.norm.weight": ["a"]}}, r"must name a shard file in the folder, got \['a'\]"),
    ({"weight_map": {"model.norm.weight": ""}}, "must name a shard file in the folder, got ''"),
    ({"weight_map": {"model.norm.weight": "../model-00001.safetensors"}}, "must name a shard file in the folder"),
    ({"weight_map": {"model.norm.weight": "/etc/passwd"}}, "must name a shard file in the folder"),
    ({"weight_map": {"model.norm.weight": ".."}}, "must name a shard file in the folder"),
])
def test_index_files(sharded, index, says):
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"^{sharded / INDEX_FILE}: .*{says}"):
        _reader(sharded)


def test_index_that_is_not_json(sharded):
    for text in ("{", "[" * 100_000, '{"weight_map": {"a": ' + "1" * 5000 + "}}"):
        (sharded / INDEX_FILE).write_text(text)
        with pytest.raises(CheckpointError, match=f"{sharded / INDEX_FILE} is not valid JSON"):
            _reader(sharded)
    (sharded / INDEX_FILE).write_text(" " * (65 << 20))
    with pytest.raises(CheckpointError, match="too large for an index"):
        _reader(sharded)


def test_missing_shards_and_tensors(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.remove(sharded / first)
    with pytest.raises(CheckpointError, match=f"shards named in the index are missing: {first}"):
        _reader(sharded)
    shutil.copy(sharded / sorted(set(index["weight_map"].values()))[1], sharded / first)   # the wrong tensors
    with pytest.raises(MissingTensorsError, match="tensors the model needs are missing"):
        _reader(sharded)
    os.remove(sharded / INDEX_FILE)
    with pytest.raises(CheckpointError, match=f"has neither {INDEX_FILE} nor {SINGLE_FILE}"):
        _reader(sharded)


@pytest.mark.parametrize("content", [b"", b"hello world", os.urandom(4096), b"\x0a\x05hello",
                                     json.dumps({"model": {"type": "BPE"}}).encode()])
def test_tokenizer_model_that_is_not_sentencepiece(sharded, content):
    (sharded / "tokenizer.model").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{sharded / 'tokenizer.model'} is not a SentencePiece model"):
        Step1Tokenizer.from_folder(str(sharded))
    with pytest.raises(CheckpointError, match="is not a SentencePiece model"):
        LLM(str(sharded), device="cpu", kernel_backend="reference")


def test_tokenizer_model_missing_or_too_large(sharded):
    os.remove(sharded / "tokenizer.model")
    with pytest.raises(CheckpointError, match="tokenizer model not found"):
        Step1Tokenizer.from_folder(str(sharded))
    with open(sharded / "tokenizer.model", "wb") as f:
        f.truncate(65 << 20)                                # sparse: no 65 MB written
    with pytest.raises(CheckpointError, match="too large for a SentencePiece model"):
        Step1Tokenizer.from_folder(str(sharded))


def test_audio_token_with_an_absurd_number(tiny_model):
    tok = Step1Tokenizer.from_folder(tiny_model)
    assert tok.encode("<audio_5119>") == [65536 + 5119]
    for text in ("<audio_5120>", "<audio_" + "9" * 5000 + ">"):   # int() of 5000 digits raises ValueError
        with pytest.raises(InvalidRequestError, match="audio codes run from 0 to 5119"):
            tok.encode(text)
