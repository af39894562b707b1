"""The backend choice of every kernel call (kernels/backend.py): "auto" / "triton" / "reference"
per call, and KernelConfig, which modules hold instead of a process-wide switch."""
import dataclasses

import pytest
import torch

from stepvox.kernels import BACKENDS, KernelConfig, use_triton
from stepvox.kernels.backend import INTERPRETER_ACTIVE, check_backend, num_sms


def test_use_triton_per_backend_on_cpu_tensors():
    t = torch.zeros(3)
    assert INTERPRETER_ACTIVE                        # conftest sets TRITON_INTERPRET=1 before triton loads
    assert use_triton(t, "reference") is False
    assert use_triton(t, "triton") is True
    assert use_triton(t, "auto") is True             # CPU tensors under the interpreter
    assert use_triton(t) is True                     # "auto" is the default
    for bad in ("Triton", "cuda", "", None, "torch"):
        with pytest.raises(ValueError, match="backend"):
            use_triton(t, bad)


def test_check_backend():
    assert BACKENDS == ("auto", "reference", "triton")
    for name in BACKENDS:
        assert check_backend(name) == name
    with pytest.raises(ValueError, match="one of"):
        check_backend("interpreter")


def test_kernel_config_defaults_and_validation():
    cfg = KernelConfig()
    assert (cfg.backend, cfg.pdl) == ("auto", True)
    assert KernelConfig(backend="reference", pdl=False) == KernelConfig("reference", False)
    with pytest.raises(ValueError, match="backend"):
        KernelConfig(backend="fast")
    with pytest.raises(ValueError, match="pdl"):
        KernelConfig(pdl=1)
    with pytest.raises(ValueError, match="pdl"):
        KernelConfig(pdl="no")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backend = "reference"                    # a config is a value: nothing is switched later
    # two configs side by side, each deciding for its own calls
    t = torch.zeros(1)
    assert [use_triton(t, c.backend) for c in (KernelConfig(backend="reference"), KernelConfig())] == [False, True]


def test_num_sms_stands_in_for_cpu():
    assert num_sms(torch.device("cpu")) == 8
