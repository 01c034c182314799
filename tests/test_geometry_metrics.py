"""Element-wise metrics against a numpy float64 reference of the rule itself."""

import numpy as np
import pytest
import torch

from opdgeom.geometry import metrics
from opdgeom.geometry.metrics import bf16_sparsity, unchanged_count, update_mask


def reference_unchanged(w0: torch.Tensor, w1: torch.Tensor, eta: float) -> np.ndarray:
    a = w0.to(torch.float64).numpy()
    b = w1.to(torch.float64).numpy()
    return np.abs(b - a) <= eta * np.maximum(np.abs(a), np.abs(b))


def perturbed_pair(dtype: torch.dtype, seed: int = 0, n: int = 20_000):
    """Mix of untouched, sub-resolution, one-step and large changes, plus zeros and sign flips."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-6, 3, (n,), generator=gen)
    scale = 10.0 ** torch.randint(-6, 0, (n,), generator=gen).to(torch.float64)
    w1 = w0 * (1 + scale * torch.randn(n, generator=gen, dtype=torch.float64))
    keep = torch.rand(n, generator=gen) < 0.3
    w1[keep] = w0[keep]
    w0[:50] = 0.0
    w1[:25] = 0.0
    w1[25:50] = 1e-30
    w1[50:80] = -w0[50:80]
    return w0.to(dtype), w1.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eta", [1e-3, 2.0**-8, 1e-2, 0.0])
def test_unchanged_count_matches_float64_reference(dtype, eta):
    w0, w1 = perturbed_pair(dtype)
    expected = int(reference_unchanged(w0, w1, eta).sum())
    assert unchanged_count(w0, w1, eta) == expected
    assert bf16_sparsity(w0, w1, eta) == expected / w0.numel()


def test_bf16_shortcut_equals_formula_on_adjacent_values():
    """Every bf16 bit pattern step (normals and subnormals) must count as changed at eta=1e-3."""
    bits = torch.arange(0, 0x7F7F, 7, dtype=torch.int32).to(torch.int16)
    step0 = bits.view(torch.bfloat16)
    step1 = (bits + 1).view(torch.bfloat16)
    w0 = torch.cat([step0, -step0, step0])
    w1 = torch.cat([step1, -step1, step0])
    expected = reference_unchanged(w0, w1, 1e-3)
    assert torch.equal(~update_mask(w0, w1, 1e-3), torch.from_numpy(expected))
    assert unchanged_count(w0, w1, 1e-3) == w0.numel() // 3


def test_zeros():
    w0 = torch.tensor([0.0, 0.0, -0.0, 0.0, 1e-30])
    w1 = torch.tensor([0.0, -0.0, 0.0, 1e-30, 0.0])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        mask = update_mask(w0.to(dtype), w1.to(dtype), 1e-3)
        assert mask.tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_exact_tie_is_unchanged(dtype):
    eta = 2.0**-4  # a power of two, so eta * max is exact and the tie is real
    below = float(np.nextafter(np.float32(0.9375), np.float32(0.0)))
    if dtype == torch.bfloat16:
        below = 0.93359375  # previous bf16 value
    w0 = torch.tensor([0.9375, below, -0.9375, 1.0], dtype=dtype)
    w1 = torch.tensor([1.0, 1.0, -1.0, 0.9375], dtype=dtype)
    assert update_mask(w0, w1, eta).tolist() == [False, True, False, False]
    assert torch.equal(~update_mask(w0, w1, eta), torch.from_numpy(reference_unchanged(w0, w1, eta)))


def test_sign_flip_is_changed():
    w0 = torch.tensor([1.5, -2.0, 3e-8], dtype=torch.bfloat16)
    assert unchanged_count(w0, -w0) == 0


def test_mixed_dtypes_and_chunking(monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_NUMEL", 1000)
    w0, w1 = perturbed_pair(torch.float64, seed=3, n=12_345)
    w0 = w0.to(torch.bfloat16).reshape(15, 823)
    w1 = w1.to(torch.float32).reshape(15, 823).t().contiguous().t()  # non-contiguous view
    expected = int(reference_unchanged(w0, w1, 1e-3).sum())
    assert unchanged_count(w0, w1) == expected
    assert update_mask(w0, w1).shape == (15, 823)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="shape"):
        unchanged_count(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="eta"):
        unchanged_count(torch.zeros(3), torch.zeros(3), -1.0)
    with pytest.raises(TypeError):
        unchanged_count(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
