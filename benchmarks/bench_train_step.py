"""One GM-WAE training step (encoder, per-mode reparameterisation, decoder of all B*K codes, MMD penalty, backward,
Adam step) with the fused MMD against the float64 reference MMD (``backend="reference"``).

Shapes of the paper's MNIST run: B = 100 images, K = 10 modes, d = 10, prior samples m = B*K = 1000, the weighted
grouped MMD ``fast_imq_mmd(z (B, K, d), prior (m, d), x_weights=pi)``. The model and loss are the trainer's
(``gmwae_fast.train``: ``GMModel``, ``gmwae_loss``; ``gm_reparameterize`` on ``backend="auto"``). ``extra_info``
records the backends that really ran (``gmwae_fast.backends.last_backend``).
"""

from __future__ import annotations

import gc

import _harness
import pytest
import torch

from gmwae_fast import backends

B, K, D = 100, 10, 10
N_PRIOR = B * K
LAM = 500.0
PROVIDERS = ("fused", "reference")


def _mmd_backend(provider: str, device: torch.device):
    """``(backend name, None)`` or ``(None, reason)``: the first fused backend of the registry's ``auto`` order."""
    if provider == "reference":
        return "reference", None
    fused = [b for b in backends.auto_order(device) if b != "reference"]
    reasons = {b: backends.unavailable_reason(b, device, op="imq_mmd") for b in fused}
    for b in fused:
        if reasons[b] is None:
            return b, None
    return None, f"no fused backend usable on {device.type}: " + "; ".join(f"{b}: {r}" for b, r in reasons.items())


def _inputs(device: torch.device):
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(B, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    return gen, x


def _trainer_step(device: torch.device, backend: str, reparam_backend: str = "auto"):
    """The trainer's model and loss: ``(step, description)``."""
    from gmwae_fast.train.losses import gmwae_loss
    from gmwae_fast.train.models import GMModel
    from gmwae_fast.train.priors import make_prior

    gen, x = _inputs(device)
    model = GMModel(K=K, d=D).to(device)
    prior = make_prior("simplex", K=K, latent_dim=D).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = gmwae_loss(
            model, x, prior=prior, gen=gen, lam=LAM, n_prior=N_PRIOR, backend=backend, reparam_backend=reparam_backend
        )
        out["loss"].backward()
        opt.step()

    return step, (
        f"gmwae_fast.train GMModel + gmwae_loss (conv encoder/decoder, gm_reparameterize backend={reparam_backend})"
    )


@pytest.mark.parametrize("provider", PROVIDERS)
def test_gmwae_train_step(benchmark, provider, bench_settings, record_skip):
    s = bench_settings
    dev = s.device
    group = f"train-step B={B} K={K} d={D}"
    benchmark.group = group
    case = {
        "kind": "train_step",
        "provider": provider,
        "B": B,
        "K": K,
        "d": D,
        "m": N_PRIOR,
        "group": group,
        "device": dev.type,
        "mode": "train-step",
        "dtype": "fp32",
    }
    backend, reason = _mmd_backend(provider, dev)
    if backend is None:
        record_skip("unavailable", reason, **case)

    step, model_desc = _trainer_step(dev, backend)
    try:
        _, warmup_s = _harness.timed_call(step, dev)  # first call: warm-up (allocations, autotune)
    except torch.OutOfMemoryError as exc:
        record_skip("oom", f"out of memory: {str(exc)[:200]}", **case)
    peak, mem_method = _harness.measure_peak_memory(step, dev)
    call_s = min(_harness.timed_call(step, dev)[1] for _ in range(2))
    rounds, iterations = _harness.plan_rounds(call_s, s.target_s, 3 if call_s > 2 else s.min_rounds, s.max_rounds)

    def target():
        step()
        _harness.sync(dev)

    benchmark.pedantic(target, rounds=rounds, iterations=iterations)
    info = benchmark.extra_info
    info.update(case)
    info.update(
        mmd_backend=backends.last_backend("imq_mmd"),
        reparam_backend=backends.last_backend("gm_reparam"),
        model=model_desc,
        device_name=s.info["device_name"],
        slug=s.info["slug"],
        torch=s.info["torch"],
        gmwae_fast=s.info["build_info"].get("version"),
        torch_threads=torch.get_num_threads(),
        warmup_s=warmup_s,
        steady_call_s=call_s,
        peak_mem_bytes=peak,
        mem_method=mem_method,
    )
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None and stats.rounds:
        info.update(_harness.timing_info(stats, iterations))
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
