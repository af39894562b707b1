"""Test-wide setup: kernels run under the Triton interpreter on the CPU.

TRITON_INTERPRET must be set before `triton` is imported anywhere, hence here, first.
Engine-level tests pick the reference kernels with `use_backend("reference")` where the
interpreter would be too slow.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
