"""Share of a GM-WAE training step spent in the MMD, per backend.

    python -m gmwae_fast.train.profile_step --backends cpu reference      # the trainer's defaults: batch 100, width 128
    python -m gmwae_fast.train.profile_step --checkpoint runs/.../checkpoints/last.pt --data-dir ../shared/data \
        --mode-prune 1e-4                                                   # a trained model, late-training step

For each backend: the median wall time of a full training step (encoder, gm_reparameterize, B*K decodes,
MMD, backward, Adam) and of the MMD alone (forward + backward on tensors of the same shapes: x (B, K, d)
with weights (B, K), y (B*K, d)); share = MMD / step. By default a freshly initialised model on random images
(every step then costs the same). ``--checkpoint`` profiles a trained model (sizes from its config) and
``--data-dir`` the first B training images: with ``--mode-prune`` the decodes then depend on how confident
q_D is, which is what a late training step costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Dict, Tuple

import torch

import gmwae_fast

from .. import backends
from .._measure import timed_call
from .config import prior_and_model
from .losses import decodes_per_image, gmwae_loss
from .models import GMModel
from .priors import GMPrior, make_prior


def _median_time(fn, reps: int, warmup: int) -> float:
    """Median seconds of ``reps`` calls (each timed by ``gmwae_fast._measure.timed_call``) after ``warmup``."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_call(fn, torch.device("cpu"))[1] for _ in range(reps))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmwae_fast.train.profile_step")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--dec-channels", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=["auto", "reference"])
    p.add_argument("--reparam-backend", default="reference")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mode-prune", type=float, default=0.0, metavar="EPS", help="as the trainer's --mode-prune")
    p.add_argument("--checkpoint", default=None, help="a trainer checkpoint: profile that model (its sizes)")
    p.add_argument("--data-dir", default=None, help="MNIST: profile on the first B training images")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    return p


def _model_and_images(a) -> Tuple[GMPrior, GMModel, torch.Tensor]:
    """The prior and model (``--checkpoint``'s, else fresh with the given sizes) and the B images."""
    if a.checkpoint:
        from .checkpoint import load_checkpoint

        st = load_checkpoint(a.checkpoint)
        prior, model = prior_and_model(st["config"])
        model.load_state_dict(st["model"])
    else:
        prior = make_prior("simplex", a.modes)
        model = GMModel(a.modes, prior.d, 64, a.dec_channels)
    model = model.to(memory_format=torch.channels_last)
    if a.data_dir:
        from .data import load_mnist

        x = load_mnist(a.data_dir, download=False)[0][: a.batch_size].contiguous()
    else:
        x = torch.rand(a.batch_size, 1, 28, 28)
    return prior, model, x


def _profile_backend(a, be: str, prior: GMPrior, model: GMModel, opt, x: torch.Tensor, gen: torch.Generator) -> Dict:
    """Median step and MMD-only times with MMD backend ``be`` (and the backend that ran); prints one line."""
    B, K, d = a.batch_size, model.K, prior.d

    def step():
        kw = dict(backend=be, reparam_backend=a.reparam_backend, prune=a.mode_prune)
        out = gmwae_loss(model, x, prior=prior, gen=gen, lam=500.0, n_prior=B * K, **kw)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    z = torch.randn(B, K, d, requires_grad=True)
    logits = torch.randn(B, K, requires_grad=True)
    y = prior.sample_stratified(B * K, generator=gen)

    def mmd_only():
        m = gmwae_fast.fast_imq_mmd(
            z, y, x_weights=torch.softmax(logits, -1), backend=be, scales=gmwae_fast.GAUJAC2019_SCALES
        )
        m.backward()

    t_step = _median_time(step, a.reps, a.warmup)
    t_mmd = _median_time(mmd_only, a.reps, a.warmup)
    name = backends.last_backend("imq_mmd")  # the backend that ran
    print(
        f"{be:>9} ({name}): step {t_step * 1e3:8.1f} ms, MMD fwd+bwd {t_mmd * 1e3:8.1f} ms, "
        f"share {t_mmd / t_step:6.1%}",
        flush=True,
    )
    return {
        "resolved": name,
        "step_s": round(t_step, 6),
        "mmd_fwd_bwd_s": round(t_mmd, 6),
        "mmd_share": round(t_mmd / t_step, 3),
    }


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if not 0.0 <= a.mode_prune < 1.0:
        p.error(f"--mode-prune must be in [0, 1), got {a.mode_prune}")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    prior, model, x = _model_and_images(a)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pi = torch.softmax(model.encoder(x)[2], -1)
    res = {
        "batch_size": a.batch_size,
        "modes": model.K,
        "latent_dim": prior.d,
        "dec_channels": model.decoder.c1,
        "torch_threads": torch.get_num_threads(),
        "reparam_backend": a.reparam_backend,
        "checkpoint": a.checkpoint,
        "images": "mnist train" if a.data_dir else "random",
        "mode_prune": a.mode_prune,
        "decoded_modes_per_image": decodes_per_image(pi, a.mode_prune),
        "backends": {},
    }
    for be in a.backends:
        res["backends"][be] = _profile_backend(a, be, prior, model, opt, x, gen)
        res["reparam_backend_resolved"] = backends.last_backend("gm_reparam")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
