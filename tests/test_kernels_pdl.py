"""Programmatic dependent launch options (kernels/pdl.py): per call, from the `pdl` argument and the
tensor's device (never a process-wide switch)."""
import pytest
import torch

from stepvox.kernels.pdl import pdl_enabled, pdl_launch_options


def test_no_pdl_on_cpu_tensors():
    t = torch.zeros(2)
    for wanted in (True, False):
        assert pdl_enabled(t, wanted) is False
        assert pdl_launch_options(t, wanted) == {"USE_PDL": False}
    assert pdl_launch_options(t) == {"USE_PDL": False}


@pytest.mark.gpu
def test_pdl_follows_the_argument_and_the_device():
    t = torch.zeros(2, device="cuda")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert pdl_enabled(t, True) is hopper
    assert pdl_launch_options(t, True) == ({"USE_PDL": True, "launch_pdl": True} if hopper else {"USE_PDL": False})
    assert pdl_enabled(t, False) is False
    assert pdl_launch_options(t, False) == {"USE_PDL": False}
