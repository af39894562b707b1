"""Snake activation of the HiFT vocoder (kernels/snake.py) against its reference and the formula,
under the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.snake import snake, snake_reference

pytestmark = pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1 (set by conftest)")


def test_snake():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 333, generator=g) * 3
    alpha = torch.rand(6, generator=g) + 0.2
    out = snake(x, alpha, backend="triton")
    torch.testing.assert_close(out, snake_reference(x, alpha), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out, x + torch.sin(alpha[None, :, None] * x) ** 2 / alpha[None, :, None])


def test_snake_mask_and_backends():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 70, generator=g) * 2
    alpha = torch.rand(3, generator=g) + 0.2
    mask = torch.ones(2, 1, 70)
    mask[1, :, 41:] = 0
    out = snake(x, alpha, mask, backend="triton")
    ref = snake(x, alpha, mask, backend="reference")
    assert torch.equal(ref, snake_reference(x, alpha, mask))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-6)
    assert not out[1, :, 41:].any()
    with pytest.raises(ValueError, match="backend"):
        snake(x, alpha, backend="sine")
