"""Gaussian-mixture priors of the paper (section 3).

``simplex`` (default): K modes in d = K dimensions with mutually equidistant means (the vertices of a
regular simplex) and isotropic standard deviation sigma0; the distance between any two means is
``spacing * sigma0`` (spacing = 4 in the paper, about 5% overlap between neighbouring modes).

``rot2d``: d = 2, mode 0 has mean (1, 0) and standard deviations (0.1, 0.5) (we read the paper's
``sigma0 = diag(0.1, 0.5)`` as the per-axis standard deviations), mode k is mode 0 rotated by
theta_k = 2 pi k / K (mean and covariance).

A prior is described by ``means`` (K, d) and ``stds`` (K, d) (diagonal in the encoder's frame) plus, for
rot2d, full covariances; ``sample`` draws from the uniform mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

PRIORS = ("simplex", "rot2d")


@dataclass
class GMPrior:
    name: str
    means: torch.Tensor  # (K, d)
    chol: torch.Tensor  # (K, d, d) lower-triangular Cholesky factors of the covariances
    K: int
    d: int

    @property
    def covs(self) -> torch.Tensor:
        return self.chol @ self.chol.transpose(-1, -2)

    @property
    def diag_stds(self) -> torch.Tensor:
        """(K, d) standard deviations of the marginals (sqrt of the covariance diagonal)."""
        return torch.diagonal(self.covs, dim1=-2, dim2=-1).sqrt()

    def to(self, device) -> "GMPrior":
        return GMPrior(self.name, self.means.to(device), self.chol.to(device), self.K, self.d)

    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_modes: bool = False):
        """n samples from the uniform mixture (the mode of each sample drawn uniformly)."""
        dev = self.means.device
        k = torch.randint(0, self.K, (n,), generator=generator, device=dev)
        eps = torch.randn(n, self.d, generator=generator, device=dev, dtype=self.means.dtype)
        z = self.means[k] + torch.einsum("nij,nj->ni", self.chol[k], eps)
        return (z, k) if return_modes else z

    def sample_stratified(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n samples with the modes taken in turn (mode i % K for sample i): the same uniform mixture,
        with less variance in the per-mode counts (n a multiple of K gives exactly n/K per mode)."""
        dev = self.means.device
        k = torch.arange(n, device=dev) % self.K
        eps = torch.randn(n, self.d, generator=generator, device=dev, dtype=self.means.dtype)
        return self.means[k] + torch.einsum("nij,nj->ni", self.chol[k], eps)

    def sample_mode(
        self, k: int, n: int, generator: Optional[torch.Generator] = None, scale: float = 1.0
    ) -> torch.Tensor:
        """n samples from mode k, with the standard deviation multiplied by ``scale``."""
        eps = torch.randn(n, self.d, generator=generator, device=self.means.device, dtype=self.means.dtype)
        return self.means[k] + scale * eps @ self.chol[k].T


def simplex_prior(K: int = 10, sigma0: float = 1.0, spacing: float = 4.0, d: Optional[int] = None) -> GMPrior:
    """Regular simplex in R^d (d >= K - 1; default d = K): centred one-hot vectors, scaled so that
    ||mu_i - mu_j|| = spacing * sigma0 for every i != j."""
    d = K if d is None else d
    if d < K - 1:
        raise ValueError(f"a regular simplex with {K} vertices needs d >= {K - 1}, got d={d}")
    e = torch.eye(K, dtype=torch.float64)
    v = e - e.mean(0, keepdim=True)  # centred, pairwise distance sqrt(2), rank K-1
    if d != K:  # project onto an orthonormal basis of the span
        q, _ = torch.linalg.qr(v.T)  # (K, K)
        v = v @ q[:, : K - 1]
        if d > K - 1:
            v = torch.cat([v, v.new_zeros(K, d - (K - 1))], 1)
    means = v * (spacing * sigma0 / math.sqrt(2.0))
    chol = (sigma0 * torch.eye(d, dtype=torch.float64)).expand(K, d, d).clone()
    return GMPrior("simplex", means.float(), chol.float(), K, d)


def rot2d_prior(K: int = 10, mu0=(1.0, 0.0), std0=(0.1, 0.5)) -> GMPrior:
    means, chols = [], []
    m0 = torch.tensor(mu0, dtype=torch.float64)
    s0 = torch.diag(torch.tensor(std0, dtype=torch.float64))
    for k in range(K):
        th = 2 * math.pi * k / K
        R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
        means.append(R @ m0)
        cov = R @ s0 @ s0.T @ R.T
        chols.append(torch.linalg.cholesky(cov))
    return GMPrior("rot2d", torch.stack(means).float(), torch.stack(chols).float(), K, 2)


def make_prior(name: str, K: int = 10, sigma0: float = 1.0, latent_dim: Optional[int] = None) -> GMPrior:
    if name == "simplex":
        return simplex_prior(K, sigma0=sigma0, d=latent_dim)
    if name == "rot2d":
        if latent_dim not in (None, 2):
            raise ValueError("the rot2d prior is 2-dimensional")
        return rot2d_prior(K)
    raise ValueError(f"unknown prior {name!r}; choose from {PRIORS}")
