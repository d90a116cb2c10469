"""Augmentation-consistency term for q_D (beyond the paper; off by default).

The paper's GM-WAE clusters MNIST by what the decoder finds cheapest to reconstruct per mode, so q_D can spend
two modes on two slants of "1" and merge 4/9 or 5/8. This optional term asks q_D to give
an image and a small random affine warp of it the same mode distribution:

    consistency(x) = mean_b KL( sg(q_D(.|x_b)) || q_D(.|warp(x_b)) )

(``sg`` = stop-gradient: the clean view is the target, as in UDA/FixMatch). The trainer adds ``gamma`` times it
to the GM-WAE or GM-VAE loss (``--consistency GAMMA``); the reconstruction and MMD terms still see the clean
images only. The MMD keeps the aggregated posterior on the uniform mixture, so the modes cannot all collapse
onto one invariant answer.

The warp: rotation by U(-r, r) degrees, shear (x += s * y) by U(-s, s), isotropic scale by U(1 - a, 1 + a) and
translation by U(-t, t) pixels on each axis, drawn per image from the trainer's generator (so runs stay
reproducible and ``--resume`` exact), applied with bilinear ``grid_sample`` and zero fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineRange:
    """Half-widths of the uniform ranges of :func:`random_affine` (all zero = the identity)."""

    rotate_deg: float = 15.0
    shear: float = 0.3
    scale: float = 0.1
    translate_px: float = 2.0

    def __post_init__(self):
        for name in ("rotate_deg", "shear", "scale", "translate_px"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"AffineRange.{name} must be a finite number >= 0, got {v!r}")
        if self.scale >= 1:
            raise ValueError(
                f"AffineRange.scale must be below 1 (the scale is drawn from U(1-a, 1+a)), got {self.scale}"
            )


def affine_warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp images ``x`` (B, C, H, W) with per-image sampling matrices ``theta`` (B, 2, 3) in the normalised
    coordinates of ``F.affine_grid`` (``align_corners=False``: one pixel is 2/W in x, 2/H in y); output pixel p
    reads input position ``theta @ [p, 1]``, bilinearly, zero outside the image."""
    if x.dim() != 4:
        raise ValueError(f"affine_warp: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if theta.shape != (x.shape[0], 2, 3):
        raise ValueError(f"affine_warp: theta must be ({x.shape[0]}, 2, 3), got {tuple(theta.shape)}")
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(x: torch.Tensor, gen: torch.Generator, rng: AffineRange = AffineRange()) -> torch.Tensor:
    """``x`` (B, C, H, W) warped by one random affine map per image (see the module docstring); the draws come
    from ``gen``, 5 uniforms per image.

    Example::

        g = torch.Generator().manual_seed(0)
        x_aug = random_affine(torch.rand(8, 1, 28, 28), g, AffineRange(rotate_deg=10))
    """
    return affine_from_uniforms(x, affine_uniforms(x.shape[0], gen), rng)


def affine_uniforms(n: int, gen: torch.Generator) -> torch.Tensor:
    """The (n, 5) U(-1, 1) draws of :func:`random_affine` for n images (a data-parallel run draws them for the
    global batch on every rank and uses its rows)."""
    return torch.rand(n, 5, generator=gen, device=gen.device) * 2 - 1


def affine_from_uniforms(x: torch.Tensor, u: torch.Tensor, rng: AffineRange = AffineRange()) -> torch.Tensor:
    """``x`` (B, C, H, W) warped by the maps that the draws ``u`` (B, 5) in U(-1, 1) select in ``rng``."""
    B, _, H, W = x.shape
    u = u.to(x.device)
    ang = u[:, 0] * math.radians(rng.rotate_deg)
    sh = u[:, 1] * rng.shear
    sc = 1 + u[:, 2] * rng.scale
    tx = u[:, 3] * rng.translate_px * 2 / W
    ty = u[:, 4] * rng.translate_px * 2 / H
    c, s = torch.cos(ang) / sc, torch.sin(ang) / sc
    # rotation @ shear, divided by the scale (theta maps output to input coordinates)
    theta = torch.stack([torch.stack([c, c * sh - s, tx], -1), torch.stack([s, s * sh + c, ty], -1)], 1)
    return affine_warp(x, theta)


def consistency_kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """mean_b KL( softmax(target_logits_b) || softmax(logits_b) ), with no gradient into ``target_logits``.
    Shapes (B, K) -> scalar."""
    if target_logits.shape != logits.shape or logits.dim() != 2:
        raise ValueError(
            f"consistency_kl: need two (B, K) tensors of one shape, got {tuple(target_logits.shape)} "
            f"and {tuple(logits.shape)}"
        )
    t = torch.log_softmax(target_logits.detach(), -1)
    return (t.exp() * (t - torch.log_softmax(logits, -1))).sum(-1).mean()
