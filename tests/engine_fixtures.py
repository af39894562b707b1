"""Shared fixtures for engine tests: tiny random Step1 folders in the released format."""
import pytest

from stepvox.engine.random_checkpoint import write_random_step1
from stepvox.kernels import use_backend


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


@pytest.fixture()
def reference_kernels():
    """Engine tests on CPU run the PyTorch references of the kernels (the interpreter is slow)."""
    with use_backend("reference"):
        yield
