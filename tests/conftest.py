"""Test-wide setup and the fixtures several test files share.

Kernels run under the Triton interpreter on the CPU: TRITON_INTERPRET must be set before `triton` is
imported anywhere, hence here, first. Model-level tests pass `KernelConfig(backend="reference")`
(the `reference_kernels` fixture) where the interpreter would be too slow.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

from stepvox.engine.audio.decoder import SpeechDecoder  # noqa: E402
from stepvox.kernels import KernelConfig  # noqa: E402
from stepvox.testing.cosyvoice import write_cosyvoice_dir  # noqa: E402
from stepvox.testing.speech import espeak_wav  # noqa: E402
from stepvox.testing.step1 import write_random_step1  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def reference_kernels() -> KernelConfig:
    """The plain-PyTorch kernels: model-level tests on the CPU (the interpreter is slow)."""
    return KernelConfig(backend="reference")


# ---------------------------------------------------------------- Step1 folders
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """2 layers, hidden 64, 4 query / 2 KV heads, the real 74752-token vocabulary, two shards."""
    return write_random_step1(str(tmp_path_factory.mktemp("tiny-step1")), seed=1, num_shards=2)


@pytest.fixture(scope="session")
def tiny_model_single_file(tmp_path_factory):
    """Another layout: one model.safetensors, 3 layers, GQA 6:1 with head dim 16."""
    return write_random_step1(str(tmp_path_factory.mktemp("tiny-step1-single")), seed=2, num_shards=1,
                              hidden_size=96, num_attention_heads=6, num_attention_groups=1,
                              intermediate_size=160, num_hidden_layers=3)


# ---------------------------------------------------------------- speech decoder
@pytest.fixture(scope="session")
def cosyvoice_dir(tmp_path_factory) -> str:
    """A tiny CosyVoice-300M-25Hz folder (cosyvoice.yaml, flow.pt, hift.pt, campplus.onnx)."""
    return write_cosyvoice_dir(str(tmp_path_factory.mktemp("cosyvoice") / "CosyVoice-300M-25Hz"), seed=0)


@pytest.fixture(scope="session")
def tiny_decoder(cosyvoice_dir, reference_kernels):
    return SpeechDecoder.from_pretrained(cosyvoice_dir, device="cpu", kernels=reference_kernels)


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> str:
    """A WAV file of espeak-ng speech (22.05 kHz mono)."""
    path = str(tmp_path_factory.mktemp("speech") / "prompt.wav")
    espeak_wav(path, "one two three, testing the prompt")
    return path
