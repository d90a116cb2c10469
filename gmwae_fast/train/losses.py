"""GM-WAE (eq. 16) and GM-VAE (eq. 3) objectives on top of the package's public ops.

Both call ``gmwae_fast.gm_reparameterize`` (z, pi from the encoder outputs, with noise drawn here from
the trainer's own generator as the op's ``seed``, so runs are reproducible and resumable) and the WAE calls
``gmwae_fast.fast_imq_mmd(z, prior_samples, x_weights=pi, backend=...)``; both are looked up on the package at
each call. The losses take everything but the model and the batch as keyword arguments::

    res = gmwae_loss(model, x, prior=prior, gen=gen, lam=500.0, n_prior=1000)
    res = add_consistency(res, model, x, gen=gen, gamma=50.0, warp=AffineRange())
    res = add_balance(res, weight=100.0)
    objective(res).backward()

Every loss takes ``shards`` (:class:`.dist.Shards`, default: one process and the whole batch): in a data-parallel
run ``x`` is this rank's rows of the global batch, the random numbers are drawn for the global batch and sliced,
batch means become this rank's share ``(n_r / N) mean_r`` (logged after a sum over the ranks), the MMD is the global
one (``process_group=``) and ``res["_objective"]`` is what the rank backpropagates (:func:`.dist.rank_objective`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import gmwae_fast

from .augment import AffineRange, affine_from_uniforms, affine_uniforms, consistency_kl
from .dist import Shards, rank_objective
from .priors import GMPrior


# --------------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------------
def draw_seed(gen: torch.Generator) -> int:
    """A 62-bit seed for gm_reparameterize from the trainer's generator (checkpointed)."""
    return int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())


def encode_sample(model, x, *, gen: torch.Generator, backend: str = "auto"):
    """The encoder outputs of ``x`` and a reparameterised sample: ``mu, sigma_raw, logits, z, pi``."""
    mu, sigma_raw, logits = model.encoder(x)
    z, pi = gmwae_fast.gm_reparameterize(mu, sigma_raw, logits, seed=draw_seed(gen), backend=backend)
    return mu, sigma_raw, logits, z, pi


def global_noise(seed: int, shape, like: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The ``eps`` of shape ``(N, K, d)`` that ``gm_reparameterize(..., seed=seed, backend=backend)`` draws for a
    whole batch of N images (the op's counter is the element index), so that shards of the batch, computed apart,
    get the noise the whole batch gets: with ``mu = sigma_raw = 0`` and ``sigma = exp(0) = 1``, ``z`` is ``eps``."""
    zeros = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return gmwae_fast.gm_reparameterize(
        zeros, zeros, zeros[..., 0], seed=seed, sigma_activation="exp", backend=backend
    )[0]


@dataclass
class Part:
    """One local shard's images and encodings: x (n, 1, 28, 28); mu, sigma_raw, z (n, K, d); logits, pi (n, K)."""

    x: torch.Tensor
    mu: torch.Tensor
    sigma_raw: torch.Tensor
    logits: torch.Tensor
    z: torch.Tensor
    pi: torch.Tensor


def encode_shards(model, x, *, gen: torch.Generator, backend: str, sh: Shards) -> List[Part]:
    """:func:`encode_sample` of this process's rows ``x``, each local shard through the encoder on its own (its
    own batch-norm statistics), with the reparameterisation noise of the global batch (one seed from ``gen``)."""
    if sh.whole:
        return [Part(x, *encode_sample(model, x, gen=gen, backend=backend))]
    seed, noise, parts = draw_seed(gen), None, []
    for s, ((lo, hi), x_s) in enumerate(zip(sh.bounds, sh.local(x))):
        with sh.running_stats(model, s):
            mu, sigma_raw, logits = model.encoder(x_s)
        if noise is None:
            noise = global_noise(seed, (sh.total, *mu.shape[1:]), mu, backend)
        z, pi = gmwae_fast.gm_reparameterize(mu, sigma_raw, logits, noise=noise[lo:hi], backend=backend)
        parts.append(Part(x_s, mu, sigma_raw, logits, z, pi))
    return parts


def _cat(parts: List[Part], name: str) -> torch.Tensor:
    return parts[0].__dict__[name] if len(parts) == 1 else torch.cat([p.__dict__[name] for p in parts])


def shard_mean(model, sh: Shards, parts: List[Part], fn: Callable[[Part], torch.Tensor]) -> torch.Tensor:
    """This process's share of a batch mean, ``sum_s (n_s / N) fn(part_s)`` with ``fn`` the mean over one shard
    (run with the shard's own batch-norm statistics); the whole batch's ``fn`` with one shard."""
    if sh.whole:
        return fn(parts[0])
    total = None
    for s, (w, part) in enumerate(zip(sh.weights(), parts)):
        with sh.running_stats(model, s):
            v = w * fn(part)
        total = v if total is None else total + v
    return total


def _result(
    terms: List[Tuple[str, Optional[float], torch.Tensor, bool]],
    parts: List[Part],
    sh: Shards,
    pi_global: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """The loss dict of a step. ``terms``: ``(name, weight, tensor, is_share)``; a share is this process's part
    ``(n_r / N) mean_r`` of a batch mean, a non-share a global value (the distributed MMD); weight ``None``: logged,
    not in the loss; names starting with ``_`` are not logged.

    ``loss``: the global loss (with its graph in one process); the logged terms: global values (shares summed over
    the ranks, one all-reduce); ``pi``: q_D of the global batch (N, K), detached; ``logits``: this process's rows,
    with gradient; ``_objective``: what this process backpropagates (:func:`rank_objective`)."""
    obj = rank_objective([(w, t) for _, w, t, _ in terms if w is not None], sh.world)
    if sh.world == 1:
        loss, glob = obj, {n: t.detach() for n, _, t, _ in terms}
        pi = _cat(parts, "pi").detach()
    else:
        shares = [t.detach().to(torch.float64).reshape(1) for _, _, t, share in terms if share]
        reduced = iter(sh.all_sum(torch.cat(shares)).unbind() if shares else ())
        glob = {n: (next(reduced).to(t.dtype) if share else t.detach()) for n, _, t, share in terms}
        loss = rank_objective([(w, glob[n]) for n, w, _, _ in terms if w is not None], 1)
        pi = pi_global if pi_global is not None else sh.gather_rows(_cat(parts, "pi"))
    res = {"loss": loss, **{n: v for n, v in glob.items() if not n.startswith("_")}}
    res.update(pi=pi, logits=_cat(parts, "logits"), _objective=obj, _terms=terms, _parts=parts)
    return res


def _extend(res: Dict, terms: List[Tuple[str, Optional[float], torch.Tensor, bool]], sh: Shards) -> Dict:
    """``res`` with more ``terms`` (see :func:`_result`); a plain ``{"loss", "logits"}`` dict gets them added."""
    if "_terms" in res:
        return _result(res["_terms"] + terms, res["_parts"], sh, res["pi"])
    out = dict(res)
    for name, w, t, _ in terms:
        out["loss"] = out["loss"] + w * t
        out[name] = t.detach()
    return out


def objective(res: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor this process backpropagates for the loss dict ``res``."""
    return res.get("_objective", res["loss"])


def kept_modes(pi: torch.Tensor, prune: float) -> torch.Tensor:
    """(B, K) bool: the modes :func:`mode_expectation` decodes, pi_bk > prune or each row's most likely mode."""
    with torch.no_grad():
        return (pi > prune) | (pi == pi.amax(1, keepdim=True))


def decodes_per_image(pi: torch.Tensor, prune: float) -> float:
    """Mean latents per image :func:`mode_expectation` decodes (K when ``prune`` is 0), to 3 decimals."""
    if prune <= 0.0:
        return float(pi.shape[1])
    return round(float(kept_modes(pi, prune).sum(1).float().mean()), 3)


def mode_expectation(model, x, z, pi, cost: Callable, prune: float = 0.0) -> torch.Tensor:
    """Batch mean of E_{k ~ q_D(k|x)} cost(x, g(z_k)) = mean_b sum_k pi_bk cost(x_b, decode(z_bk)).

    x (B, 1, 28, 28); z (B, K, d); pi (B, K); ``cost(x_rows, logits_rows) -> (M,)`` per image.

    ``prune = 0`` (default) decodes all B*K latents: the exact expectation. ``prune = eps > 0`` decodes only the
    latents of the modes with pi_bk > eps (and each image's most likely mode) and renormalises pi over them:
    sum_{k in S_b} pi_bk c_bk / sum_{k in S_b} pi_bk. Its value differs from the exact one by at most the
    dropped mass (< K*eps per image) times the spread of the costs, and the dropped modes' logits get no
    gradient from it (they still get the MMD's). q_D soon becomes confident: with eps = 1e-4 the decodes per
    image fell from 10 to 3.5 by epoch 3 and 1.6 by epoch 20 in our MNIST runs, and a 20-epoch CPU run took
    28 min instead of about 2.2 h. The decoder's batch norm then sees only the kept latents.
    """
    B, K = pi.shape
    if prune <= 0.0:
        logits = model.decode(z)  # (B, K, 1, 28, 28)
        c = cost(x.unsqueeze(1).expand_as(logits).flatten(0, 1), logits.flatten(0, 1)).view(B, K)
        return (pi * c).sum(1).mean()
    keep = kept_modes(pi, prune)
    b_idx, k_idx = keep.nonzero(as_tuple=True)
    c = cost(x[b_idx], model.decode(z[b_idx, k_idx]))  # (M,)
    w = pi * keep
    w = w / w.sum(1, keepdim=True)
    return (w[b_idx, k_idx] * c).sum() / B


def _l2_cost(x, logits):
    return (torch.sigmoid(logits) - x).pow(2).flatten(1).sum(-1)


def _bernoulli_nll(x, logits):
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)


def gmwae_loss(
    model,
    x,
    *,
    prior: GMPrior,
    gen: torch.Generator,
    lam: float,
    n_prior: int,
    backend: str = "auto",
    reparam_backend: str = "auto",
    recon_scale: float = 1.0,
    prune: float = 0.0,
    shards: Optional[Shards] = None,
) -> Dict[str, torch.Tensor]:
    """recon_scale * sum_k pi_k ||x - g(z_k)||^2 + lam * MMD; ``recon`` is reported unscaled.
    ``prune``: see :func:`mode_expectation`. ``shards`` (default: one process, the whole batch ``x``): ``x`` is this
    process's rows of the global batch and the MMD is that of the global batch (see :mod:`.dist`); the ``n_prior``
    prior samples are drawn for the global batch and split like it."""
    sh = shards or Shards.single(len(x))
    parts = encode_shards(model, x, gen=gen, backend=reparam_backend, sh=sh)
    recon = shard_mean(model, sh, parts, lambda p: mode_expectation(model, p.x, p.z, p.pi, _l2_cost, prune))
    pz = sh.rows_of(prior.sample_stratified(n_prior, generator=gen))
    mmd = gmwae_fast.fast_imq_mmd(
        _cat(parts, "z"),
        pz,
        x_weights=_cat(parts, "pi"),
        backend=backend,
        scales=gmwae_fast.GAUJAC2019_SCALES,
        **sh.mmd_kwargs(),
    )
    return _result([("recon", recon_scale, recon, True), ("mmd", lam, mmd, False)], parts, sh)


def gaussian_kl_to_prior(mu, sigma, prior: GMPrior):
    """KL( N(mu_k, diag sigma_k^2) || N(m_k, Sigma_k) ) for every (b, k) -> (B, K)."""
    d = mu.shape[-1]
    L = prior.chol  # (K, d, d)
    diff = prior.means - mu  # (B, K, d)
    # Sigma^-1 via triangular solves: ||L^-1 diff||^2 and tr(Sigma^-1 S) = ||L^-1 diag(sigma)||_F^2
    Linv = torch.linalg.inv(L)  # small (K, d, d)
    maha = torch.einsum("kij,bkj->bki", Linv, diff).pow(2).sum(-1)
    tr = (Linv.pow(2).unsqueeze(0) * sigma.pow(2).unsqueeze(-2)).sum((-1, -2))  # sum_ij Linv_ij^2 s_j^2
    logdet_p = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (K,)
    logdet_q = 2 * torch.log(sigma).sum(-1)  # (B, K)
    return 0.5 * (tr + maha - d + logdet_p - logdet_q)


def gmvae_loss(
    model,
    x,
    *,
    prior: GMPrior,
    gen: torch.Generator,
    beta: float,
    reparam_backend: str = "auto",
    prune: float = 0.0,
    shards: Optional[Shards] = None,
) -> Dict[str, torch.Tensor]:
    """sum_k pi_k [-log p(x|z_k)] + beta * (KL_C + KL_D); ``prune``: see :func:`mode_expectation`; ``shards``: as
    in :func:`gmwae_loss`."""
    sh = shards or Shards.single(len(x))
    parts = encode_shards(model, x, gen=gen, backend=reparam_backend, sh=sh)
    rec = shard_mean(model, sh, parts, lambda p: mode_expectation(model, p.x, p.z, p.pi, _bernoulli_nll, prune))

    def kl_c_of(p: Part):
        return (p.pi * gaussian_kl_to_prior(p.mu, F.softplus(p.sigma_raw), prior)).sum(1).mean()

    def kl_d_of(p: Part):
        return (p.pi * (torch.log_softmax(p.logits, -1) + math.log(model.K))).sum(1).mean()

    kl_c, kl_d = shard_mean(model, sh, parts, kl_c_of), shard_mean(model, sh, parts, kl_d_of)
    return _result(
        [
            ("recon", 1.0, rec, True),
            ("_kl", beta, kl_c + kl_d, True),
            ("kl_c", None, kl_c, True),
            ("kl_d", None, kl_d, True),
        ],
        parts,
        sh,
    )


def add_consistency(
    res: Dict[str, torch.Tensor],
    model,
    x,
    *,
    gen: torch.Generator,
    gamma: float,
    warp: AffineRange,
    shards: Optional[Shards] = None,
) -> Dict[str, torch.Tensor]:
    """Adds ``gamma * consistency_kl(q_D(x), q_D(random_affine(x)))`` to the loss ``res`` of
    :func:`gmwae_loss` / :func:`gmvae_loss` for the batch ``x`` and records the KL as ``res["consistency"]``
    (see :mod:`.augment`; one extra pass of the q_D conv net, the warp drawn from ``gen`` for the global batch;
    ``shards`` as given to the loss)."""
    sh = shards or Shards.single(len(x))
    u = affine_uniforms(sh.total, gen)
    kls = []
    for s, ((lo, hi), x_s, logits_s) in enumerate(zip(sh.bounds, sh.local(x), sh.local(res["logits"]))):
        with sh.running_stats(model, s):
            kls.append(consistency_kl(logits_s, model.encoder.q_d_logits(affine_from_uniforms(x_s, u[lo:hi], warp))))
    kl = kls[0] if sh.whole else sum(w * k for w, k in zip(sh.weights(), kls))
    return _extend(res, [("consistency", gamma, kl, True)], sh)


def add_balance(
    res: Dict[str, torch.Tensor], *, weight: float, shards: Optional[Shards] = None
) -> Dict[str, torch.Tensor]:
    """Adds ``weight * KL(pbar || uniform)`` to the loss ``res`` of :func:`gmwae_loss` / :func:`gmvae_loss`,
    pbar = the batch mean of q_D(.|x) (with gradient through ``res["logits"]``), and records the KL as
    ``res["balance"]``. Beyond the paper: the MMD sees only z, so the continuous encoders can hide unequal mode
    sizes from it (a mode holding two classes puts some of its latents near another mode's prior mean); this
    asks q_D itself to use the modes equally, as the uniform prior p_D says. Data-parallel (``shards`` of several
    ranks): pbar is the global batch mean (one all-reduce), with gradient through this rank's rows."""
    sh = shards or Shards.single(len(res["logits"]))
    p = torch.softmax(res["logits"], -1)
    if sh.world == 1:
        pbar = p.mean(0)
    else:
        local = p.sum(0)
        pbar = (local + (sh.all_sum(local) - local.detach())) / sh.total
    kl = (pbar * torch.log(pbar * pbar.numel()).clamp_min(-1e4)).sum()
    return _extend(res, [("balance", weight, kl, False)], sh)


def pretrain_loss(model, x, *, prior: GMPrior):
    """Match every mode's encoder mean / std to the prior's (section 3: pretraining the q_C nets)."""
    mu, sigma_raw, _ = model.encoder(x)
    sigma = F.softplus(sigma_raw)
    return (mu - prior.means).pow(2).sum(-1).mean() + (sigma - prior.diag_stds).pow(2).sum(-1).mean()
