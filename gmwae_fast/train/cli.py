"""Command line trainer.

    python -m gmwae_fast.train --model gmwae --prior simplex --data-dir ../shared/data --steps 600 --out runs/x

Outputs under --out: metrics.jsonl (one JSON object per log/eval), summary.json, checkpoints/last.pt
(atomic, every --ckpt-every steps, at the end and on Ctrl-C) and figures/*.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from . import checkpoint as ck
from .data import Batcher, MissingDataError, default_data_dir, load_mnist, subset
from .augment import AffineRange
from .losses import (add_balance, add_consistency, decodes_per_image, gmvae_loss, gmwae_loss, pretrain_loss,
                     resolve_ops, resolved_backend)
from .metrics import evaluate, kmeans_baseline
from .models import GMModel
from .priors import PRIORS, GMPrior, make_prior

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
KNOWN_BACKENDS = ("auto", "reference", "cpu", "cpp", "cuda", "triton")


class TrainingDiverged(RuntimeError):
    pass


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def _backend(s: str) -> str:
    names = {"auto", "reference"}
    try:
        from gmwae_fast.backends import BACKENDS
        names |= set(BACKENDS)
    except Exception:
        names |= set(KNOWN_BACKENDS)
    if s not in names:
        raise argparse.ArgumentTypeError(f"unknown backend {s!r}; choose from {sorted(names)}")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmwae_fast.train",
                                description="Train a GM-WAE (or the GM-VAE baseline) on MNIST.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("gmwae", "gmvae"), default="gmwae")
    p.add_argument("--prior", choices=PRIORS, default="simplex")
    p.add_argument("--dataset", choices=("mnist",), default="mnist")
    p.add_argument("--data-dir", default=None,
                   help="directory holding MNIST/raw (default: $GMWAE_DATA, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    p.add_argument("--steps", type=_positive_int, default=600,
                   help="training steps after pretraining (600 steps of 100 images: about 7 min on a 2-core "
                        "CPU; the paper's 20 epochs are 12000 steps at batch 100)")
    p.add_argument("--batch-size", type=_positive_int, default=100, help="images per step (the paper's 100)")
    p.add_argument("--lr", type=_positive_float, default=5e-4)
    p.add_argument("--lr-decay-from", type=_nonneg_int, default=None, metavar="STEP",
                   help="from this step on, the learning rate falls along a half cosine from --lr to --lr-final "
                        "at --steps (default: constant --lr). Set it when resuming to anneal a finished run.")
    p.add_argument("--lr-final", type=_nonneg_float, default=0.0, help="learning rate at --steps with --lr-decay-from")
    p.add_argument("--lam", type=_nonneg_float, default=500.0, help="MMD weight (GM-WAE)")
    p.add_argument("--recon-scale", type=_positive_float, default=1.0,
                   help="GM-WAE cost c(x,y) = recon_scale * ||x-y||^2 (1: the paper's squared L2; the WAE code's "
                        "l2sq is 0.05, which left q_D to the MMD and clustered worse: see results/README.md)")
    p.add_argument("--beta", type=_nonneg_float, default=1.0, help="weight of the KL terms (GM-VAE)")
    p.add_argument("--mode-prune", type=_nonneg_float, default=0.0, metavar="EPS",
                   help="decode only the modes with q_D(k|x) > EPS (and the most likely one) and renormalise the "
                        "reconstruction expectation over them; 0 decodes all K modes (the exact objective). 1e-4 "
                        "ran 20 epochs on a 2-core CPU in 28 min instead of about 2.2 h: see results/README.md")
    g = p.add_argument_group("q_D regularisers (beyond the paper; off by default)")
    g.add_argument("--consistency", type=_nonneg_float, default=0.0, metavar="GAMMA",
                   help="add GAMMA * KL(q_D(.|x) || q_D(.|warp(x))) to the loss, warp a random affine map, no gradient "
                        "through the clean view (gmwae_fast/train/augment.py); 0 = the paper's objective")
    g.add_argument("--balance", type=_nonneg_float, default=0.0, metavar="W",
                   help="add W * KL(batch mean of q_D || uniform) to the loss (losses.add_balance); 0 = off")
    g.add_argument("--aug-rotate", type=_nonneg_float, default=15.0, metavar="DEG", help="rotation U(-DEG, DEG)")
    g.add_argument("--aug-shear", type=_nonneg_float, default=0.3, help="shear x += s*y, s ~ U(-S, S)")
    g.add_argument("--aug-scale", type=_nonneg_float, default=0.1, help="scale U(1-A, 1+A), A < 1")
    g.add_argument("--aug-translate", type=_nonneg_float, default=2.0, metavar="PX",
                   help="translation U(-PX, PX) pixels per axis")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default=None, help="output directory (default runs/<model>_<prior>_seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="initialise the networks from a trained checkpoint (e.g. GM-VAE from a GM-WAE)")
    p.add_argument("--mmd-backend", type=_backend, default="auto", help="backend of gmwae_fast.fast_imq_mmd")
    p.add_argument("--reparam-backend", type=_backend, default="auto",
                   help="backend of gmwae_fast.gm_reparameterize")
    g = p.add_argument_group("model")
    g.add_argument("--modes", type=_positive_int, default=10, help="K")
    g.add_argument("--latent-dim", type=_positive_int, default=None,
                   help="d for the simplex prior (default K; rot2d is always 2)")
    g.add_argument("--sigma0", type=_positive_float, default=1.0, help="simplex prior std (means 4*sigma0 apart)")
    g.add_argument("--enc-channels", type=_positive_int, default=64, help="widest encoder conv layer")
    g.add_argument("--dec-channels", type=_positive_int, default=128,
                   help="widest decoder layer (the paper's 128; 64 halves the CPU cost of the B*K decodes but "
                        "clusters worse: see results/README.md)")
    g.add_argument("--hidden", type=_positive_int, default=32, help="hidden units of the q_C dense nets")
    g.add_argument("--prior-samples", type=_positive_int, default=None,
                   help="prior samples per MMD estimate, modes taken in turn (default: batch size x K)")
    g.add_argument("--qc-input", choices=("pixels", "features"), default="pixels",
                   help="what the per-mode q_C dense nets read: pixels, or the q_D conv features")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last memory format for the convs (auto: on for CPU)")
    g.add_argument("--adam-beta1", type=_nonneg_float, default=0.5)
    g.add_argument("--pretrain-steps", type=_nonneg_int, default=200,
                   help="steps matching the q_C nets to the prior moments (skipped with --init-from)")
    g = p.add_argument_group("logging / evaluation")
    g.add_argument("--log-every", type=_positive_int, default=10)
    g.add_argument("--eval-every", type=_positive_int, default=200)
    g.add_argument("--ckpt-every", type=_positive_int, default=100)
    g.add_argument("--eval-recon", type=_positive_int, default=500,
                   help="test images used for recon L2 / Bernoulli NLL / MMD")
    g.add_argument("--train-subset", type=_positive_int, default=None, help="use only N training images")
    g.add_argument("--test-subset", type=_positive_int, default=None, help="evaluate on only N test images")
    g.add_argument("--no-kmeans", action="store_true", help="skip the k-means-on-pixels baseline")
    g.add_argument("--no-figures", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--debug-nan-at-step", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-interrupt-at-step", type=_positive_int, default=None, help=argparse.SUPPRESS)
    return p


def lr_at(step: int, a) -> float:
    """Learning rate of the update that follows ``step`` completed steps (a function of the step alone, so a
    resumed run follows the same schedule): ``--lr`` up to ``--lr-decay-from``, then a half cosine down to
    ``--lr-final`` at ``--steps``."""
    if a.lr_decay_from is None or step < a.lr_decay_from:
        return a.lr
    t = min(1.0, (step - a.lr_decay_from) / (a.steps - a.lr_decay_from))
    return a.lr_final + 0.5 * (a.lr - a.lr_final) * (1.0 + math.cos(math.pi * t))


def _check_args(p: argparse.ArgumentParser, a) -> None:
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if a.prior == "rot2d" and a.latent_dim not in (None, 2):
        p.error("--prior rot2d is 2-dimensional; drop --latent-dim or pass 2")
    if a.prior == "simplex" and a.latent_dim is not None and a.latent_dim < a.modes - 1:
        p.error(f"--latent-dim must be >= modes-1 = {a.modes - 1} for the simplex prior")
    if a.resume and a.init_from:
        p.error("--resume and --init-from are mutually exclusive")
    if a.init_from and not Path(a.init_from).is_file():
        p.error(f"--init-from: no such checkpoint {a.init_from!r}")
    if a.mode_prune >= 1.0:
        p.error(f"--mode-prune ({a.mode_prune}) must be below 1 (0 disables it)")
    if a.aug_scale >= 1.0:
        p.error(f"--aug-scale ({a.aug_scale}) must be below 1")
    if a.lr_decay_from is not None and a.lr_decay_from >= a.steps:
        p.error(f"--lr-decay-from ({a.lr_decay_from}) must be below --steps ({a.steps})")
    if a.lr_final > a.lr:
        p.error(f"--lr-final ({a.lr_final}) must not exceed --lr ({a.lr})")
    if a.train_subset is not None and a.train_subset < a.batch_size:
        p.error(f"--train-subset ({a.train_subset}) must be >= --batch-size ({a.batch_size})")


def prior_and_model(cfg: Dict) -> Tuple[GMPrior, GMModel]:
    """The prior and a freshly initialised model for a trainer config (``vars(args)``, or a checkpoint's
    ``config``), on the CPU."""
    prior = make_prior(cfg["prior"], cfg["modes"], cfg["sigma0"], cfg["latent_dim"])
    model = GMModel(cfg["modes"], prior.d, cfg["enc_channels"], cfg["dec_channels"], cfg["hidden"], cfg["qc_input"])
    return prior, model


def _config(a) -> Dict:
    return {k: v for k, v in vars(a).items() if not k.startswith("debug_")}


class _Stop:
    """First Ctrl-C: finish the current step, checkpoint, exit. Second Ctrl-C: abort."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _append_jsonl(path: Path, rec: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(l + "\n" for l in keep))


def _machine_info(device) -> Dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _check_args(parser, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if (a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()))
                          else "cpu")
    out = Path(a.out or f"runs/{a.model}_{a.prior}_seed{a.seed}")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoints" / ck.CKPT_NAME
    metrics_path = out / "metrics.jsonl"
    if a.resume and not ckpt_path.exists():
        parser.error(f"--resume: no checkpoint at {ckpt_path}")

    try:
        ops = resolve_ops()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data_dir = a.data_dir or default_data_dir()
    try:
        x_tr, y_tr, x_te, y_te = load_mnist(data_dir, download=not a.no_download)
    except MissingDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    x_tr, y_tr = subset(x_tr, y_tr, a.train_subset, a.seed)
    x_te, y_te = subset(x_te, y_te, a.test_subset, 0)
    x_tr, x_te = x_tr.to(device), x_te.to(device)

    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    prior, model = prior_and_model(vars(a))
    prior, model = prior.to(device), model.to(device)
    model.encoder.init_to_prior(prior.means, prior.diag_stds)
    if a.channels_last == "on" or (a.channels_last == "auto" and device.type == "cpu"):
        model = model.to(memory_format=torch.channels_last)
    n_prior = a.prior_samples or a.batch_size * a.modes
    batcher = Batcher(x_tr, y_tr, a.batch_size, a.seed)
    try:
        mmd_backend_used = resolved_backend(a.mmd_backend, device, ops)
    except (RuntimeError, ValueError) as e:
        print(f"error: --mmd-backend {a.mmd_backend}: {e}", file=sys.stderr)
        return 2

    step, wall_prev, last_eval = 0, 0.0, None
    if a.resume:
        st = ck.load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(st["model"])
        opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(a.adam_beta1, 0.999))
        opt.load_state_dict(st["optimizer"])
        ck.set_rng_state(st["rng"], gen)
        step, wall_prev, last_eval = st["step"], st.get("wall_s", 0.0), st.get("last_eval")
        _truncate_metrics(metrics_path, step)
        print(f"resumed from {ckpt_path} at step {step}", file=sys.stderr)
    else:
        if metrics_path.exists():
            metrics_path.unlink()
        if a.init_from:
            st = ck.load_checkpoint(a.init_from, map_location=device)
            model.load_state_dict(st["model"] if "model" in st else st)
        elif a.pretrain_steps:
            popt = torch.optim.Adam(model.encoder.parameters(), lr=a.lr, betas=(a.adam_beta1, 0.999))
            pb = Batcher(x_tr, y_tr, a.batch_size, a.seed + 7919)
            for i in range(a.pretrain_steps):
                x, _ = pb.batch(i)
                loss = pretrain_loss(model, x, prior)
                popt.zero_grad(set_to_none=True)
                loss.backward()
                popt.step()
            _append_jsonl(metrics_path, {"kind": "pretrain", "step": 0, "pretrain_steps": a.pretrain_steps,
                                         "pretrain_loss": loss.item()})
        opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(a.adam_beta1, 0.999))
        _save(ckpt_path, model, opt, gen, step, 0.0, last_eval, a)

    loss_fn = _make_loss_fn(a, prior, gen, ops, n_prior)
    t0 = time.perf_counter()
    bar = None
    if not a.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=a.steps, initial=step, desc=a.model, dynamic_ncols=True)
    model.train()
    status = "completed"
    with _Stop() as stop:
        while step < a.steps:
            x, _ = batcher.batch(step)
            res = loss_fn(model, x)
            loss = res["loss"]
            if a.debug_nan_at_step is not None and step + 1 == a.debug_nan_at_step:
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                msg = (f"non-finite loss ({loss.item()}) at step {step + 1}; training stopped. The last good "
                       f"checkpoint is kept at {ckpt_path} (step {_ckpt_step(ckpt_path)}); lower --lr/--lam "
                       f"or resume from it with --resume.")
                if bar:
                    bar.close()
                print(f"error: {msg}", file=sys.stderr)
                _append_jsonl(metrics_path, {"kind": "diverged", "step": step + 1, "message": msg})
                return EXIT_DIVERGED
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = lr_at(step, a)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            step += 1
            if a.debug_interrupt_at_step is not None and step == a.debug_interrupt_at_step:
                stop.requested = True          # behaves exactly like a first Ctrl-C after this step
            if step % a.log_every == 0 or step == a.steps:
                rec = {"kind": "train", "step": step, "epoch": round(batcher.epoch_of(step), 4), "lr": lr,
                       **{k: float(v.detach()) for k, v in res.items() if k not in ("pi", "logits")}}
                pi = res["pi"]
                rec["batch_active_modes"] = int((torch.bincount(pi.argmax(1), minlength=a.modes)
                                                 >= max(1, 0.01 * len(pi))).sum())
                if a.mode_prune > 0:
                    rec["decoded_modes"] = decodes_per_image(pi, a.mode_prune)
                _append_jsonl(metrics_path, rec)
            if step % a.eval_every == 0 or step == a.steps:
                last_eval = dict(_eval(model, x_te, y_te, prior, ops, a), step=step)
                _append_jsonl(metrics_path, {"kind": "eval", "step": step, "epoch": round(batcher.epoch_of(step), 4),
                                             **{k: v for k, v in last_eval.items() if k not in ("heatmap", "class_to_mode", "step")}})
            if bar:
                post = {"loss": f"{loss.item():.3f}"}
                if last_eval:
                    post["acc"] = f"{last_eval['test_accuracy']:.3f}"
                    post["modes"] = last_eval["active_modes"]
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if step % a.ckpt_every == 0 or step == a.steps or stop.requested:
                _save(ckpt_path, model, opt, gen, step, wall_prev + time.perf_counter() - t0, last_eval, a)
            if stop.requested:
                status = "interrupted"
                break
    if bar:
        bar.close()
    wall = wall_prev + time.perf_counter() - t0
    if status == "interrupted":
        print(f"interrupted at step {step}; checkpoint saved to {ckpt_path} (continue with --resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED

    if last_eval is None or last_eval.get("step") != step:   # e.g. --resume with --steps <= the saved step
        last_eval = dict(_eval(model, x_te, y_te, prior, ops, a), step=step)
        _append_jsonl(metrics_path, {"kind": "eval", "step": step, "epoch": round(batcher.epoch_of(step), 4),
                                     **{k: v for k, v in last_eval.items()
                                        if k not in ("heatmap", "class_to_mode", "step")}})
    summary = {k: last_eval[k] for k in ("test_accuracy", "active_modes", "usage_kl", "recon_l2", "bernoulli_nll",
                                         "mmd", "mode_usage", "class_to_mode")}
    summary.update({"model": a.model, "prior": a.prior, "steps": step,
                    "epochs": round(batcher.epoch_of(step), 3), "wall_s": round(wall, 2),
                    "sec_per_step": round(wall / max(step, 1), 4), "device": str(device),
                    "mmd_backend": mmd_backend_used, "mmd_backend_requested": a.mmd_backend,
                    "reparam_backend": _reparam_backend_used(a.reparam_backend, device), "config": _config(a), "machine": _machine_info(device),
                    "train_images": len(x_tr), "test_images": len(x_te)})
    if not a.no_kmeans:
        t = time.perf_counter()
        summary["kmeans_accuracy"] = kmeans_baseline(x_tr.cpu(), x_te.cpu(), y_te.cpu(), a.modes, seed=a.seed)
        summary["kmeans_wall_s"] = round(time.perf_counter() - t, 2)
        last_eval = dict(last_eval, kmeans_accuracy=summary["kmeans_accuracy"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    fig_dir = out / "figures"
    if not a.no_figures:
        from .figures import make_all_figures
        make_all_figures(model, prior, x_te, y_te, last_eval, metrics_path, fig_dir, ops, a)
    print(f"test accuracy {summary['test_accuracy']:.4f}, active modes {summary['active_modes']}/{a.modes}"
          + (f", k-means {summary['kmeans_accuracy']:.4f}" if "kmeans_accuracy" in summary else "")
          + f"; {step} steps in {wall:.1f}s on {device}")
    print(f"summary: {out / 'summary.json'}")
    if not a.no_figures:
        print(f"figures: {fig_dir}/")
    return 0


def _reparam_backend_used(requested: str, device) -> str:
    try:
        from gmwae_fast.backends import resolve_backend
        return resolve_backend(requested, device)
    except Exception:
        return requested


def _ckpt_step(path: Path):
    try:
        return ck.load_checkpoint(path)["step"]
    except Exception:
        return "unknown"


def _save(path, model, opt, gen, step, wall, last_eval, a):
    ck.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": ck.rng_state(gen),
                    "step": step, "wall_s": wall, "last_eval": last_eval, "config": _config(a)}, path)


def _eval(model, x_te, y_te, prior, ops, a):
    return evaluate(model, x_te, y_te, prior, ops, backend=a.mmd_backend, reparam_backend=a.reparam_backend,
                    n_recon=a.eval_recon, seed=a.seed + 1234)


def _make_loss_fn(a, prior, gen, ops, n_prior):
    if a.model == "gmwae":
        def base(model, x):
            return gmwae_loss(model, x, prior, gen, ops, a.lam, n_prior, a.mmd_backend, a.reparam_backend,
                              a.recon_scale, a.mode_prune)
    else:
        def base(model, x):
            return gmvae_loss(model, x, prior, gen, ops, a.beta, a.reparam_backend, a.mode_prune)
    warp = AffineRange(a.aug_rotate, a.aug_shear, a.aug_scale, a.aug_translate)

    def fn(model, x):
        res = base(model, x)
        if a.consistency:
            res = add_consistency(res, model, x, gen, a.consistency, warp)
        if a.balance:
            res = add_balance(res, a.balance)
        return res
    return fn
