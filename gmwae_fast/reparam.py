"""Fused per-mode reparameterised encoding of a Gaussian-mixture encoder: :func:`gm_reparameterize`."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .ops import gm_reparam as _ops
from .ops._autograd import refuse_forward_ad

__all__ = ["SIGMA_ACTIVATIONS", "gm_reparameterize"]

#: Accepted values of ``sigma_activation``.
SIGMA_ACTIVATIONS: tuple[str, ...] = ("softplus", "exp")

_SEED_LIMIT = 2**63


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _seed_tensor(seed: object, device: torch.device) -> Tensor:
    """An explicit ``seed`` as an int64 tensor with one element (on the CPU for an int: nothing is copied)."""
    if isinstance(seed, Tensor):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an int or an integer tensor, got a tensor of dtype {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"seed must be a single value, got a tensor of shape {tuple(seed.shape)}")
        if seed.device != device and seed.device.type != "cpu":
            raise ValueError(f"seed is on {seed.device} but mu is on {device}; put it on {device} or on the CPU")
        # A CPU seed is read on the host (free); a device seed is not read (a sync), nor is a traced one.
        if seed.device.type == "cpu" and not torch.compiler.is_compiling():
            value = int(seed.reshape(()))
            if not 0 <= value < _SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**63), got {value}")
        return seed.reshape(()).to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be None, an int or an integer tensor, got {type(seed).__name__}")
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64)


def _reference(
    mu: Tensor, sigma_raw: Tensor, logits: Tensor, seed: Optional[Tensor], noise: Optional[Tensor], activation: str
) -> tuple[Tensor, Tensor]:
    """The unfused PyTorch sequence (autograd by PyTorch), math in float32 (float64 for float64 inputs)."""
    dtype = mu.dtype
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    sr = sigma_raw.to(cdt)
    sigma = F.softplus(sr) if activation == "softplus" else torch.exp(sr)
    if noise is not None:
        eps = noise.to(cdt)
    elif seed is None:
        eps = torch.randn_like(sigma)
    else:
        gen = torch.Generator(device=mu.device)
        gen.manual_seed(int(seed))
        eps = torch.randn(sigma.shape, generator=gen, dtype=cdt, device=mu.device)
    z = (mu.to(cdt) + sigma * eps).to(dtype)
    lcdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    pi = torch.softmax(logits.to(lcdt), dim=-1).to(logits.dtype)
    return z, pi


def gm_reparameterize(
    mu: Tensor,
    sigma_raw: Tensor,
    logits: Tensor,
    *,
    seed: Union[int, Tensor, None] = None,
    noise: Optional[Tensor] = None,
    sigma_activation: str = "softplus",
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    r"""Reparameterised samples of all ``K`` Gaussian modes of every input, and the mode weights, in one fused op.

    .. math::

        z_{bk} = \mu_{bk} + \operatorname{act}(s_{bk}) \odot \varepsilon_{bk}, \qquad
        \varepsilon_{bk} \sim \mathcal N(0, I_d), \qquad
        \pi_{bk} = \frac{e^{\ell_{bk}}}{\sum_{k'} e^{\ell_{bk'}}}

    with ``act = softplus`` (default) or ``exp``. The fused backends draw ``eps`` inside the kernel from a
    counter-based generator (Philox4x32-10 keyed by ``seed``, counter = element index; Box-Muller) and never store
    it: the backward regenerates it. The unfused sequence (``softplus``, ``randn_like``, ``mul``, ``add``,
    ``softmax``) launches five kernels and autograd keeps the ``(B, K, d)`` noise alive for the backward (with
    ``sigma_raw`` and ``pi``); this op launches one kernel each way and saves only ``sigma_raw``, ``logits`` and
    the seed.

    Gradients flow to ``mu`` (``grad_z``), ``sigma_raw`` (``grad_z * eps * act'(sigma_raw)``) and ``logits``
    (softmax backward). ``noise`` is treated as a constant.

    Args:
        mu: ``(B, K, d)`` mode means.
        sigma_raw: ``(B, K, d)`` pre-activation scales (``sigma = act(sigma_raw)``).
        logits: ``(B, K)`` unnormalised mode log-weights.
        seed: ``None`` (default) draws a fresh seed from torch's default generator on the inputs' device (as an
            int64 tensor, without a host sync, so ``torch.manual_seed`` makes runs reproducible and
            :func:`torch.compile` sees no graph break). An ``int`` in ``[0, 2**63)`` or an integer tensor with one
            element (on the inputs' device or the CPU; a CPU tensor's value is checked to lie in ``[0, 2**63)``, a
            device tensor's is not read, which would sync) gives the same ``eps`` on every call. The same seed gives
            the same noise on the ``cpu`` and ``cuda`` backends (same Philox bits and float32 operations) and,
            to ~1e-6, on ``triton``; ``reference`` uses ``torch.Generator().manual_seed(seed)`` instead (and is
            then not traceable by :func:`torch.compile`). Under :func:`torch.compile` a ``None`` seed is drawn by
            inductor's generator (itself seeded by torch's), so compiled and eager code draw different noise after
            the same ``torch.manual_seed``; each is reproducible.
        noise: ``(B, K, d)`` explicit ``eps`` (exact replay, tests); excludes ``seed``, no generator is used.
        sigma_activation: ``"softplus"`` (default; identity above 20 like :func:`torch.nn.functional.softplus`)
            or ``"exp"``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"`` (the unfused PyTorch sequence;
            see :func:`gmwae_fast.available_backends` with ``op="gm_reparam"``). ``"auto"`` takes the first backend
            of :func:`gmwae_fast.backends.auto_order` that has this op family's kernels;
            :func:`gmwae_fast.backends.last_backend` ``("gm_reparam")`` names the one that ran.

    Returns:
        ``(z, pi)``: ``z`` ``(B, K, d)`` in the promoted dtype of ``mu`` and ``sigma_raw``, ``pi`` ``(B, K)`` in
        ``logits``'s dtype. float16 / bfloat16 inputs are computed in float32, float64 inputs in float64.

    Example::

        >>> mu, sigma_raw, logits = encoder(images)           # (B, K, d), (B, K, d), (B, K)
        >>> z, pi = gmwae_fast.gm_reparameterize(mu, sigma_raw, logits)
        >>> penalty = gmwae_fast.fast_imq_mmd(z, prior_samples, x_weights=pi)
        >>> torch.manual_seed(0)                               # reproducible, like torch.randn_like
        >>> z2, _ = gmwae_fast.gm_reparameterize(mu, sigma_raw, logits, seed=1234)  # fixed noise
    """
    mu = _check_tensor("mu", mu)
    sigma_raw = _check_tensor("sigma_raw", sigma_raw)
    logits = _check_tensor("logits", logits)
    if mu.dim() != 3:
        raise ValueError(f"mu must have shape (B, K, d), got {tuple(mu.shape)} ({mu.dim()} dims)")
    if sigma_raw.shape != mu.shape:
        raise ValueError(f"sigma_raw must have the shape of mu, {tuple(mu.shape)}, got {tuple(sigma_raw.shape)}")
    if tuple(logits.shape) != tuple(mu.shape[:2]):
        raise ValueError(f"logits must have shape (B, K) = {tuple(mu.shape[:2])}, got {tuple(logits.shape)}")
    if mu.numel() == 0:
        raise ValueError(f"mu is empty (shape {tuple(mu.shape)}); B, K and d must all be >= 1")
    for name, t in (("sigma_raw", sigma_raw), ("logits", logits)):
        if t.device != mu.device:
            raise ValueError(f"{name} is on {t.device} but mu is on {mu.device}; put all inputs on one device")
    if not isinstance(sigma_activation, str) or sigma_activation not in SIGMA_ACTIVATIONS:
        raise ValueError(f"unknown sigma_activation {sigma_activation!r}; expected one of {SIGMA_ACTIVATIONS}")
    backends.check_backend_name(backend)
    if noise is not None:
        noise = _check_tensor("noise", noise)
        if noise.shape != mu.shape:
            raise ValueError(f"noise must have the shape of mu, {tuple(mu.shape)}, got {tuple(noise.shape)}")
        if noise.device != mu.device:
            raise ValueError(f"noise is on {noise.device} but mu is on {mu.device}")
        if seed is not None:
            raise ValueError("give either seed or noise, not both (noise replaces the generator)")
    seed_t = _seed_tensor(seed, mu.device) if seed is not None else None
    name = backends.select_backend(backend, str(mu.device), "gm_reparam")
    if name != "reference":
        refuse_forward_ad("gm_reparameterize", name, (mu, sigma_raw, logits))

    dtype = torch.promote_types(mu.dtype, sigma_raw.dtype)
    mu = mu.to(dtype)
    sigma_raw = sigma_raw.to(dtype)
    if noise is not None:
        noise = noise.detach().to(dtype).contiguous()
    if name == "reference":
        return _reference(mu, sigma_raw, logits, seed_t, noise, sigma_activation)

    if noise is None and seed_t is None:
        # A fresh seed from the default generator of the inputs' device, kept as a tensor: no host sync, and
        # torch.compile traces it as an ordinary random op (inductor draws it from its own seeded stream).
        seed_t = torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64, device=mu.device)
    op = _ops.op_set(name).forward
    return op(mu.contiguous(), sigma_raw.contiguous(), logits.contiguous(), seed_t, noise, sigma_activation)
