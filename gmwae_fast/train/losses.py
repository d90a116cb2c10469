"""GM-WAE (eq. 16) and GM-VAE (eq. 3) objectives on top of the package's public ops.

Both call ``gmwae_fast.gm_reparameterize`` (z, pi from the encoder outputs, with noise drawn here from
the trainer's own generator as the op's ``seed``, so runs are reproducible and resumable) and the WAE calls
``gmwae_fast.fast_imq_mmd(z, prior_samples, x_weights=pi, backend=...)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .priors import GMPrior

@dataclass
class Ops:
    fast_imq_mmd: Callable
    gm_reparameterize: Callable


def resolve_ops() -> Ops:
    """The package's public ``fast_imq_mmd`` and ``gm_reparameterize`` (RuntimeError naming what is missing)."""
    try:
        import gmwae_fast
    except Exception as e:  # pragma: no cover - depends on the package build
        raise RuntimeError(f"import gmwae_fast failed: {e}") from e
    missing = [n for n in ("fast_imq_mmd", "gm_reparameterize") if not hasattr(gmwae_fast, n)]
    if missing:
        raise RuntimeError("the trainer needs gmwae_fast." + " and gmwae_fast.".join(missing)
                           + ", which this gmwae_fast does not provide")
    return Ops(gmwae_fast.fast_imq_mmd, gmwae_fast.gm_reparameterize)


def resolved_backend(requested: str, device: torch.device, ops: Ops) -> str:
    """Name of the backend ``fast_imq_mmd`` actually runs for ``requested`` on ``device`` (raises
    RuntimeError / ValueError with the package's reason when it cannot run)."""
    from gmwae_fast.backends import resolve_backend
    return resolve_backend(requested, device)


# --------------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------------
def draw_seed(gen: torch.Generator) -> int:
    """A 62-bit seed for gm_reparameterize from the trainer's generator (checkpointed)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=gen.device).item())


def encode_sample(model, x, gen: torch.Generator, ops: Ops, backend: str = "auto"):
    mu, sigma_raw, logits = model.encoder(x)
    z, pi = ops.gm_reparameterize(mu, sigma_raw, logits, seed=draw_seed(gen), backend=backend)
    return mu, sigma_raw, logits, z, pi


def gmwae_loss(model, x, prior: GMPrior, gen: torch.Generator, ops: Ops, lam: float,
               n_prior: int, backend: str = "auto", reparam_backend: str = "auto",
               recon_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """recon_scale * sum_k pi_k ||x - g(z_k)||^2 + lam * MMD; ``recon`` is reported unscaled."""
    mu, sigma_raw, logits, z, pi = encode_sample(model, x, gen, ops, reparam_backend)
    xr = torch.sigmoid(model.decode(z))                                         # (B, K, 1, 28, 28)
    l2 = (xr - x.unsqueeze(1)).pow(2).flatten(2).sum(-1)                        # (B, K)
    recon = (pi * l2).sum(1).mean()
    pz = prior.sample_stratified(n_prior, generator=gen)
    mmd = ops.fast_imq_mmd(z, pz, x_weights=pi, backend=backend)
    loss = recon_scale * recon + lam * mmd
    return {"loss": loss, "recon": recon.detach(), "mmd": mmd.detach(), "pi": pi.detach()}


def gaussian_kl_to_prior(mu, sigma, prior: GMPrior):
    """KL( N(mu_k, diag sigma_k^2) || N(m_k, Sigma_k) ) for every (b, k) -> (B, K)."""
    d = mu.shape[-1]
    L = prior.chol                                                               # (K, d, d)
    diff = (prior.means - mu)                                                    # (B, K, d)
    # Sigma^-1 via triangular solves: ||L^-1 diff||^2 and tr(Sigma^-1 S) = ||L^-1 diag(sigma)||_F^2
    Linv = torch.linalg.inv(L)                                                   # small (K, d, d)
    maha = torch.einsum("kij,bkj->bki", Linv, diff).pow(2).sum(-1)
    tr = (Linv.pow(2).unsqueeze(0) * sigma.pow(2).unsqueeze(-2)).sum((-1, -2))   # sum_ij Linv_ij^2 s_j^2
    logdet_p = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)       # (K,)
    logdet_q = 2 * torch.log(sigma).sum(-1)                                      # (B, K)
    return 0.5 * (tr + maha - d + logdet_p - logdet_q)


def gmvae_loss(model, x, prior: GMPrior, gen: torch.Generator, ops: Ops, beta: float,
               reparam_backend: str = "auto") -> Dict[str, torch.Tensor]:
    mu, sigma_raw, logits, z, pi = encode_sample(model, x, gen, ops, reparam_backend)
    xl = model.decode(z)                                                         # (B, K, 1, 28, 28)
    bce = F.binary_cross_entropy_with_logits(xl, x.unsqueeze(1).expand_as(xl), reduction="none")
    nll = bce.flatten(2).sum(-1)                                                 # (B, K)
    rec = (pi * nll).sum(1).mean()
    sigma = F.softplus(sigma_raw)
    kl_c = (pi * gaussian_kl_to_prior(mu, sigma, prior)).sum(1).mean()
    logpi = torch.log_softmax(logits, -1)
    kl_d = (pi * (logpi + math.log(model.K))).sum(1).mean()
    loss = rec + beta * (kl_c + kl_d)
    return {"loss": loss, "recon": rec.detach(), "kl_c": kl_c.detach(), "kl_d": kl_d.detach(),
            "pi": pi.detach()}


def pretrain_loss(model, x, prior: GMPrior):
    """Match every mode's encoder mean / std to the prior's (section 3: pretraining the q_C nets)."""
    mu, sigma_raw, _ = model.encoder(x)
    sigma = F.softplus(sigma_raw)
    return (mu - prior.means).pow(2).sum(-1).mean() + (sigma - prior.diag_stds).pow(2).sum(-1).mean()
