"""Element-wise metrics against a numpy float64 reference of the rule itself."""

import numpy as np
import pytest
import torch

from opdgeom.geometry import metrics
from opdgeom.geometry.metrics import bf16_sparsity, unchanged_count, update_mask, update_norms


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_update_norms_against_float64(dtype, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_NUMEL", 1000)  # several chunks
    rng = np.random.default_rng(11)
    w0 = torch.from_numpy(0.02 * rng.standard_normal((61, 77))).to(dtype)
    w1 = (w0.double() + 1e-4 * torch.from_numpy(rng.standard_normal((61, 77)))).to(dtype)
    a, b = w0.double().numpy(), w1.double().numpy()
    delta, base = update_norms(w0, w1)
    tolerance = 1e-12 if dtype == torch.float64 else 3e-7
    assert delta == pytest.approx(np.sqrt(((b - a) ** 2).sum()), rel=tolerance)
    assert base == pytest.approx(np.sqrt((a**2).sum()), rel=tolerance)
    huge0, huge1 = torch.tensor([3e30, 1.0]).to(dtype), torch.tensor([-3e30, 1.0]).to(dtype)
    got = update_norms(huge0, huge1)  # squares overflow float32: that chunk is redone in float64
    want = (huge1.double() - huge0.double()).norm().item(), huge0.double().norm().item()
    assert got == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- spectral metrics vs float64 numpy/scipy

import scipy.linalg  # noqa: E402

from opdgeom.geometry import (  # noqa: E402
    mask_overlap,
    operator_norm,
    principal_angles,
    spectral_shift,
    spectrum,
    stable_rank,
    subspace_similarity,
    tail_index,
    top_right_singular_vectors,
)
from opdgeom.geometry.select import extreme_mask  # noqa: E402


def power_law_matrix(m: int, n: int, seed: int, decay: float = 1.0) -> np.ndarray:
    """U diag(i^-decay) V^T: singular values spanning orders of magnitude, like trained weights."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = np.arange(1, min(m, n) + 1, dtype=np.float64) ** -decay
    return (u * s) @ v.T


def small_update_pair(kind: str, shape: tuple[int, int], rel: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        w0 = rng.standard_normal(shape) / np.sqrt(shape[1])
    else:
        w0 = power_law_matrix(*shape, seed=seed)
    noise = rng.standard_normal(shape)
    w1 = w0 + rel * np.linalg.norm(w0) / np.linalg.norm(noise) * noise
    return w0, w1


def numpy_angles(w0: np.ndarray, w1: np.ndarray, k: int, side: str) -> np.ndarray:
    u0, _, v0t = np.linalg.svd(w0, full_matrices=False)
    u1, _, v1t = np.linalg.svd(w1, full_matrices=False)
    a, b = (u0[:, :k], u1[:, :k]) if side == "left" else (v0t[:k].T, v1t[:k].T)
    return np.sort(np.rad2deg(scipy.linalg.subspace_angles(a, b)))


CASES = [
    ("gaussian", (160, 96)),
    ("gaussian", (96, 160)),
    ("power_law", (200, 120)),
    ("power_law", (120, 200)),
]


@pytest.mark.parametrize("kind, shape", CASES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_principal_angles_of_tiny_updates(kind, shape, side):
    w0, w1 = small_update_pair(kind, shape, rel=1e-5)
    expected = numpy_angles(w0, w1, 8, side)
    got = principal_angles(torch.from_numpy(w0), torch.from_numpy(w1), 8, side=side).numpy()
    assert expected.max() < 0.05  # the regime of interest: far under a degree
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


def test_principal_angles_bf16_and_fp32_inputs_are_taken_exactly():
    w0, w1 = small_update_pair("gaussian", (128, 64), rel=1e-2)
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.from_numpy(w0).to(dtype), torch.from_numpy(w1).to(dtype)
        expected = numpy_angles(a.double().numpy(), b.double().numpy(), 4, "left")
        np.testing.assert_allclose(principal_angles(a, b, 4).numpy(), expected, rtol=1e-6, atol=1e-9)
    same = torch.from_numpy(w0)
    assert principal_angles(same, same, 4).max() < 1e-6


@pytest.mark.parametrize("kind, shape", CASES)
def test_spectral_shift_of_tiny_updates(kind, shape):
    w0, w1 = small_update_pair(kind, shape, rel=1e-6, seed=1)
    s0, s1 = np.linalg.svd(w0, compute_uv=False), np.linalg.svd(w1, compute_uv=False)
    expected = np.linalg.norm(s1 - s0) / np.linalg.norm(s0)
    got = spectral_shift(torch.from_numpy(w0), torch.from_numpy(w1))
    assert expected < 1e-5
    assert abs(got - expected) < 1e-3 * expected


@pytest.mark.parametrize("kind, shape", CASES)
def test_spectrum_singular_values_and_vectors(kind, shape):
    w0, _ = small_update_pair(kind, shape, rel=0.0, seed=2)
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    spec = spectrum(torch.from_numpy(w0), 6)
    np.testing.assert_allclose(spec.sigma_r.numpy(), s, rtol=1e-9, atol=1e-13 * s[0])
    for got, ref in ((spec.left_mk, u[:, :6]), (spec.right_nk, vt[:6].T)):
        assert np.abs(np.abs(np.sum(got.numpy() * ref, axis=0)) - 1).max() < 1e-10
    reconstructed = torch.from_numpy(w0) @ spec.right_nk
    np.testing.assert_allclose(reconstructed.numpy(), (spec.left_mk * spec.sigma_r[:6]).numpy(), atol=1e-12)
    top = top_right_singular_vectors(torch.from_numpy(w0), 6).numpy()
    assert np.rad2deg(scipy.linalg.subspace_angles(top, vt[:6].T)).max() < 1e-8


@pytest.mark.parametrize("kind, shape", CASES)
def test_operator_norm_and_stable_rank(kind, shape):
    w0, w1 = small_update_pair(kind, shape, rel=1e-3, seed=3)
    dw = w1 - w0
    s = np.linalg.svd(dw, compute_uv=False)
    assert abs(operator_norm(torch.from_numpy(dw)) - s[0]) < 1e-10 * s[0]
    assert abs(stable_rank(torch.from_numpy(dw)) - (s**2).sum() / s[0] ** 2) < 1e-8
    rank_one = torch.outer(torch.randn(50, dtype=torch.float64), torch.randn(30, dtype=torch.float64))
    assert abs(stable_rank(rank_one) - 1.0) < 1e-10
    assert np.isnan(stable_rank(torch.zeros(5, 4)))


def test_subspace_similarity():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((40, 8)))
    q = torch.from_numpy(q)
    assert abs(subspace_similarity(q[:, :4], q[:, :4]) - 1) < 1e-12
    assert abs(subspace_similarity(q[:, :4], q[:, 4:])) < 1e-12
    assert abs(subspace_similarity(q[:, :4], q[:, 2:6]) - 0.5) < 1e-12
    rotated = q[:, :4] @ torch.from_numpy(scipy.linalg.qr(np.random.default_rng(1).standard_normal((4, 4)))[0])
    assert abs(subspace_similarity(q[:, :4], rotated) - 1) < 1e-12  # basis-independent


def extreme_reference(values: np.ndarray, count: int, largest: bool) -> np.ndarray:
    order = np.argsort(-values if largest else values, kind="stable", axis=None)
    mask = np.zeros(values.size, dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(values.shape)


@pytest.mark.parametrize("largest", [True, False])
def test_extreme_mask_exact_count_with_ties(largest):
    values = torch.randint(0, 7, (37, 11)).to(torch.bfloat16).float()
    for count in (0, 1, 50, 200, values.numel()):
        mask = extreme_mask(values, count, largest)
        assert int(mask.sum()) == count
        np.testing.assert_array_equal(mask.numpy(), extreme_reference(values.numpy(), count, largest))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("chunk_numel", [7, 64, 1 << 22])
def test_extreme_mask_chunked_signed_values(largest, chunk_numel):
    """Ties straddling chunk edges, negatives, both zeros and values many binades apart."""
    rng = np.random.default_rng(3)
    values = rng.choice([-3.0, -1e-30, -0.0, 0.0, 2.5e-8, 1.0, 1.0 + 2**-40, 7e30], size=(23, 9))
    values[rng.random(values.shape) < 0.3] = 1.0
    tensor = torch.from_numpy(values)
    for count in (0, 1, 40, 111, values.size):
        mask = extreme_mask(tensor, count, largest, chunk_numel=chunk_numel)
        # numpy orders -0.0 and 0.0 as equal, so the stable argsort is the reference tie order
        np.testing.assert_array_equal(mask.numpy(), extreme_reference(values, count, largest))


def test_select_rejects_bad_input():
    with pytest.raises(ValueError, match="count must be in 0..6"):
        extreme_mask(torch.ones(2, 3), 7, largest=True)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="non-finite"):
                extreme_mask(torch.tensor([1.0, bad, -2.0], dtype=dtype), 1, largest=True)


def test_mask_overlap_row_blocks_match_one_block(monkeypatch):
    """The chunked sweep (several row blocks, ties across blocks) equals a single-block pass."""
    w0, w1 = small_update_pair("power_law", (90, 70), rel=3e-2, seed=5)
    w0_t, w1_t = torch.from_numpy(w0).to(torch.bfloat16), torch.from_numpy(w1).to(torch.bfloat16)
    whole = mask_overlap(w0_t, w1_t, 0.1, 5)
    monkeypatch.setattr(metrics, "CHUNK_NUMEL", 8 * 27)
    assert mask_overlap(w0_t, w1_t, 0.1, 5) == whole
    masks = metrics.base_masks(w0_t, 0.1, 5)
    assert int(masks.principal(0, w0_t.numel()).sum()) == round(0.1 * w0_t.numel())
    restored = metrics.BaseMasks.from_dict(masks.as_dict())
    assert torch.equal(restored.principal_bits, masks.principal_bits)
    assert restored.low_magnitude == masks.low_magnitude and not restored.low_magnitude.largest
    assert mask_overlap(w0_t, w1_t, 0.1, 5, masks0=restored) == whole


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_mask_overlap_against_numpy(dtype):
    w0, w1 = small_update_pair("power_law", (90, 70), rel=3e-2, seed=4)
    w0_t, w1_t = torch.from_numpy(w0).to(dtype), torch.from_numpy(w1).to(dtype)
    a = w0_t.double().numpy()
    alpha, k = 0.1, 5
    changed = ~reference_unchanged(w0_t, w1_t, 1e-3)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    recon = np.abs((u[:, :k] * s[:k]) @ vt[:k])
    count = round(alpha * a.size)
    principal = extreme_reference(recon, count, largest=True)
    low = extreme_reference(np.abs(a), count, largest=False)
    got = mask_overlap(w0_t, w1_t, alpha, k)
    assert got["principal"] == (principal & changed).sum() / changed.sum()
    assert got["low_magnitude"] == (low & changed).sum() / changed.sum()
    assert np.isnan(mask_overlap(w0_t, w0_t, alpha, k)["principal"])


def tail_index_loop(sigma: np.ndarray, min_tail: int = 10) -> float:
    """Unvectorized Clauset MLE + KS cut-off on lambda = sigma^2, the reference for the vectorized one."""
    lam = np.sort(sigma[sigma > 1e-10 * sigma.max()] ** 2)
    best = (np.inf, np.nan)
    for j in range(lam.size - min_tail + 1):
        tail = lam[j:]
        alpha = 1 + tail.size / np.log(tail / tail[0]).sum()
        if not np.isfinite(alpha):
            continue
        fitted = 1 - (tail / tail[0]) ** (1 - alpha)
        ranks = np.arange(tail.size)
        ks = np.maximum(np.abs(fitted - ranks / tail.size), np.abs(fitted - (ranks + 1) / tail.size)).max()
        if ks < best[0]:
            best = (ks, alpha)
    return best[1]


def test_tail_index_recovers_pareto_exponent_and_matches_loop():
    rng = np.random.default_rng(0)
    for alpha in (2.0, 3.0, 4.5):
        lam = (1 - rng.random(3000)) ** (-1 / (alpha - 1))  # Pareto density lambda^-alpha, xmin = 1
        assert abs(tail_index(np.sqrt(lam)) - alpha) < 0.2
    sigma = np.sqrt((1 - rng.random(700)) ** (-1 / 1.5)) + 0.1 * rng.random(700)
    assert tail_index(torch.from_numpy(sigma)) == pytest.approx(tail_index_loop(sigma), rel=1e-10)
    assert np.isnan(tail_index(np.ones(5)))
    assert np.isnan(tail_index(np.zeros(50)))
