"""The q_D regularisers beyond the paper: augmentation consistency (gmwae_fast/train/augment.py) and the mode
balance term (losses.add_balance), against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gmwae_fast.train.augment import AffineRange, affine_warp, consistency_kl, random_affine
from gmwae_fast.train.losses import add_consistency
from gmwae_fast.train.models import GMModel


def _images(B=5, H=28, W=28, seed=0):
    return torch.rand(B, 1, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_affine_warp_identity_and_whole_pixel_shift():
    x = _images(B=3, H=12, W=9)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64).expand(3, 2, 3)
    torch.testing.assert_close(affine_warp(x, eye), x, rtol=0, atol=1e-12)
    # output pixel (i, j) reads input (i + 2, j - 1): 2 rows down, 1 column left, zero fill outside
    theta = eye.clone()
    theta[:, 0, 2] = -1 * 2 / 9
    theta[:, 1, 2] = 2 * 2 / 12
    ref = torch.zeros_like(x)
    ref[:, :, :-2, 1:] = x[:, :, 2:, :-1]
    torch.testing.assert_close(affine_warp(x, theta), ref, rtol=0, atol=1e-12)


def test_affine_warp_rotation_by_90_degrees():
    x = _images(B=2, H=10, W=10)
    # output (u, v) reads input (-v, u) in normalised coordinates, i.e. out[i, j] = in[j, W-1-i]: rot90
    theta = torch.tensor([[0.0, -1, 0], [1, 0, 0]], dtype=torch.float64).expand(2, 2, 3)
    torch.testing.assert_close(affine_warp(x, theta), torch.rot90(x, 1, dims=(2, 3)), rtol=0, atol=1e-12)


def test_affine_warp_shape_errors():
    with pytest.raises(ValueError, match="x must be"):
        affine_warp(torch.zeros(28, 28), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="theta must be"):
        affine_warp(torch.zeros(4, 1, 28, 28), torch.zeros(3, 2, 3))


def test_random_affine_zero_range_is_identity_and_draws_are_reproducible():
    x = _images()
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(random_affine(x, g, AffineRange(0, 0, 0, 0)), x, rtol=0, atol=1e-12)
    a = random_affine(x, torch.Generator().manual_seed(7))
    b = random_affine(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    first, second = random_affine(x, g), random_affine(x, g)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances
    assert not torch.allclose(a, x, atol=1e-3)  # the default range does move pixels
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1  # bilinear: a convex mix of pixels and 0


def test_random_affine_translation_only_matches_its_whole_pixel_draw():
    """With only translations, every image is a bilinear shift by the drawn offsets: check image by image
    against the same draw replayed into affine_warp."""
    x = _images(B=4)
    rng = AffineRange(rotate_deg=0, shear=0, scale=0, translate_px=3)
    out = random_affine(x, torch.Generator().manual_seed(3), rng)
    u = torch.rand(4, 5, generator=torch.Generator().manual_seed(3)).double() * 2 - 1
    theta = torch.zeros(4, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = u[:, 3] * 3 * 2 / 28
    theta[:, 1, 2] = u[:, 4] * 3 * 2 / 28
    torch.testing.assert_close(out, affine_warp(x, theta), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        dict(rotate_deg=-1),
        dict(shear=float("nan")),
        dict(scale=1.0),
        dict(translate_px=float("inf")),
        dict(scale="0.1"),
    ],
)
def test_affine_range_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="AffineRange"):
        AffineRange(**bad)


def test_consistency_kl_against_float64_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(7, 10, generator=g, dtype=torch.float64, requires_grad=True)
    l = torch.randn(7, 10, generator=g, dtype=torch.float64, requires_grad=True)
    kl = consistency_kl(t, l)
    p, q = torch.softmax(t.detach(), -1), torch.softmax(l.detach(), -1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(kl, ref, rtol=1e-12, atol=1e-14)
    kl.backward()
    assert t.grad is None  # the clean view is a fixed target
    torch.testing.assert_close(l.grad, (q - p) / 7, rtol=1e-10, atol=1e-14)
    assert consistency_kl(l.detach(), l.detach()).abs() < 1e-14
    with pytest.raises(ValueError, match="consistency_kl"):
        consistency_kl(torch.zeros(3, 10), torch.zeros(3, 9))


def test_add_consistency_adds_gamma_kl_and_trains_the_q_d_net():
    torch.manual_seed(0)
    model = GMModel(K=4, d=3, enc_channels=8, dec_channels=8, hidden=4).double()
    x = _images(B=6)
    logits = model.encoder.q_d_logits(x)
    res = {"loss": torch.zeros((), dtype=torch.float64), "logits": logits.detach()}
    warp = AffineRange()
    out = add_consistency(res, model, x, gen=torch.Generator().manual_seed(5), gamma=3.0, warp=warp)
    x_aug = random_affine(x, torch.Generator().manual_seed(5), warp)
    ref = consistency_kl(logits, model.encoder.q_d_logits(x_aug))
    torch.testing.assert_close(out["consistency"], ref.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out["loss"], 3.0 * ref, rtol=1e-10, atol=1e-14)
    out["loss"].backward()
    assert model.encoder.trunk[0].weight.grad.abs().sum() > 0 and model.encoder.logits.weight.grad.abs().sum() > 0
    assert model.decoder.fc[0].weight.grad is None  # only q_D is involved
    assert math.isfinite(out["loss"].item())


def test_add_balance_value_and_gradient_against_float64_references():
    from gmwae_fast.train.losses import add_balance

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out = add_balance({"loss": torch.tensor(1.5, dtype=torch.float64), "logits": logits}, weight=4.0)
    pbar = torch.softmax(logits.detach(), -1).mean(0).numpy()
    ref = float((pbar * np.log(5 * pbar)).sum())
    assert math.isclose(out["balance"].item(), ref, rel_tol=1e-12)
    assert math.isclose(out["loss"].item(), 1.5 + 4.0 * ref, rel_tol=1e-12)
    assert torch.autograd.gradcheck(
        lambda l: add_balance({"loss": l.sum() * 0, "logits": l}, weight=4.0)["loss"], (logits,)
    )
    # equal use of the modes is the minimum: zero value and zero gradient
    even = torch.zeros(6, 3, dtype=torch.float64, requires_grad=True)
    out = add_balance({"loss": torch.zeros((), dtype=torch.float64), "logits": even}, weight=1.0)
    out["loss"].backward()
    assert abs(out["balance"].item()) < 1e-15 and even.grad.abs().max() < 1e-15
