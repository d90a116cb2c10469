"""Command line trainer.

    python -m gmwae_fast.train --model gmwae --prior simplex --data-dir ../shared/data --steps 600 --out runs/x

Outputs under --out: metrics.jsonl (one JSON object per log/eval), summary.json, checkpoints/last.pt
(atomic and checksummed, every --ckpt-every steps, at the end and on Ctrl-C) and figures/*.png.
``--recipe robust`` bundles the q_D regularisers, mode pruning and a final annealing (explicit options win);
``--resume`` refuses options that differ from the checkpoint's except those in ``RESUME_MAY_CHANGE``.
Data-parallel: ``torchrun --nproc_per_node=R -m gmwae_fast.train ...`` (see :mod:`.dist`); rank 0 writes every
output. Exit status: 0, 2 (invalid options, or one ``error:`` line for unusable data / checkpoint / output directory /
backend), 3 (diverged), 4 (data-parallel: a collective failed or timed out because another rank failed, was killed
or is stuck), 130 (interrupted).
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from gmwae_fast.backends import backend_choices, check_backend_name, last_backend, resolve_backend

from . import checkpoint as ck
from . import dist as dp
from .augment import AffineRange
from .data import Batcher, InvalidDataError, MissingDataError, default_data_dir, load_mnist, subset
from .losses import (
    add_balance,
    add_consistency,
    decodes_per_image,
    gmvae_loss,
    gmwae_loss,
    objective,
    pretrain_loss,
    resolve_ops,
)
from .metrics import evaluate, kmeans_baseline
from .models import GMModel
from .priors import PRIORS, GMPrior, make_prior

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or non-finite values at ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


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
    try:
        return check_backend_name(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown backend {s!r}; choose from {list(backend_choices())}")


def _rank_step(s: str) -> Tuple[int, int]:
    try:
        rank, step = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK:STEP, got {s!r}")
    return rank, step


#: Option bundles for ``--recipe``: dest -> value, or a function of the parsed options. "paper" changes nothing.
RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "robust": {
        "consistency": 50.0,
        "balance": 100.0,
        "mode_prune": 1e-4,
        "lr_decay_from": lambda a: int(0.75 * a.steps),
        "lr_final": 0.0,
    },
}
#: Options that may differ from the checkpoint's on --resume (they do not change what the run computes, or
#: change only its length and the end of its learning-rate schedule).
RESUME_MAY_CHANGE = (
    "steps",
    "lr_decay_from",
    "lr_final",
    "log_every",
    "eval_every",
    "ckpt_every",
    "threads",
    "no_progress",
    "progress_seconds",
    "no_figures",
    "no_kmeans",
    "out",
    "data_dir",
    "no_download",
    "recipe",
    "dist_timeout",
)
#: Options that only concern how a run starts or resumes; never compared.
_NOT_COMPARED = ("resume", "allow_config_change", "init_from")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _recipes_help() -> str:
    def show(v):
        return "0.75*steps" if callable(v) else f"{v:g}"

    lines = ["recipes (--recipe; an option given on the command line overrides the recipe's value):"]
    for name, opts in RECIPES.items():
        body = " ".join(f"--{k.replace('_', '-')} {show(v)}" for k, v in opts.items())
        lines.append(f"  {name:7s} {body or 'the paper objective and settings: changes nothing'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gmwae_fast.train",
        description="Train a GM-WAE (or the GM-VAE baseline) on MNIST.",
        epilog=_recipes_help(),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", choices=("gmwae", "gmvae"), default="gmwae")
    p.add_argument("--prior", choices=PRIORS, default="simplex")
    p.add_argument("--dataset", choices=("mnist",), default="mnist")
    p.add_argument("--data-dir", default=None, help="directory holding MNIST/raw (default: $GMWAE_DATA, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="paper",
        help="a bundle of defaults (see the recipes below); options given explicitly override it",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=600,
        help="training steps after pretraining (the paper's 20 epochs are 12000 steps at batch 100)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=100, help="images per step, at least 2 (the paper's 100)"
    )
    p.add_argument("--lr", type=_positive_float, default=5e-4)
    p.add_argument(
        "--lr-decay-from",
        type=_nonneg_int,
        default=None,
        metavar="STEP",
        help="from this step on, the learning rate falls along a half cosine from --lr to --lr-final "
        "at --steps (default: constant --lr; --recipe robust: 0.75 * --steps). Set it when resuming "
        "to anneal a finished run.",
    )
    p.add_argument("--lr-final", type=_nonneg_float, default=0.0, help="learning rate at --steps with --lr-decay-from")
    p.add_argument("--lam", type=_nonneg_float, default=500.0, help="MMD weight (GM-WAE)")
    p.add_argument(
        "--recon-scale",
        type=_positive_float,
        default=1.0,
        help="GM-WAE cost c(x,y) = recon_scale * ||x-y||^2 (1: the paper's squared L2; the WAE code's "
        "l2sq cost is 0.05)",
    )
    p.add_argument("--beta", type=_nonneg_float, default=1.0, help="weight of the KL terms (GM-VAE)")
    p.add_argument(
        "--mode-prune",
        type=_nonneg_float,
        default=0.0,
        metavar="EPS",
        help="decode only the modes with q_D(k|x) > EPS (and the most likely one) and renormalise the "
        "reconstruction expectation over them; 0 decodes all K modes (the exact objective)",
    )
    g = p.add_argument_group("q_D regularisers (beyond the paper; off by default)")
    g.add_argument(
        "--consistency",
        type=_nonneg_float,
        default=0.0,
        metavar="GAMMA",
        help="add GAMMA * KL(q_D(.|x) || q_D(.|warp(x))) to the loss, warp a random affine map, no gradient "
        "through the clean view (gmwae_fast/train/augment.py); 0 = the paper's objective",
    )
    g.add_argument(
        "--balance",
        type=_nonneg_float,
        default=0.0,
        metavar="W",
        help="add W * KL(batch mean of q_D || uniform) to the loss (losses.add_balance); 0 = off",
    )
    g.add_argument("--aug-rotate", type=_nonneg_float, default=15.0, metavar="DEG", help="rotation U(-DEG, DEG)")
    g.add_argument("--aug-shear", type=_nonneg_float, default=0.3, help="shear x += s*y, s ~ U(-S, S)")
    g.add_argument("--aug-scale", type=_nonneg_float, default=0.1, help="scale U(1-A, 1+A), A < 1")
    g.add_argument(
        "--aug-translate", type=_nonneg_float, default=2.0, metavar="PX", help="translation U(-PX, PX) pixels per axis"
    )
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default=None, help="output directory (default runs/<model>_<prior>_seed<seed>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/checkpoints/last.pt; options that change the run must match the "
        "checkpoint's, except " + ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE),
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume, accept other differences from the checkpoint's options (recorded in "
        "metrics.jsonl as a 'resume' record); the network sizes must still match",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT",
        help="initialise the networks from a trained checkpoint (e.g. GM-VAE from a GM-WAE)",
    )
    p.add_argument("--mmd-backend", type=_backend, default="auto", help="backend of gmwae_fast.fast_imq_mmd")
    p.add_argument("--reparam-backend", type=_backend, default="auto", help="backend of gmwae_fast.gm_reparameterize")
    g = p.add_argument_group("model")
    g.add_argument("--modes", type=_positive_int, default=10, help="K")
    g.add_argument(
        "--latent-dim", type=_positive_int, default=None, help="d for the simplex prior (default K; rot2d is always 2)"
    )
    g.add_argument("--sigma0", type=_positive_float, default=1.0, help="simplex prior std (means 4*sigma0 apart)")
    g.add_argument("--enc-channels", type=_positive_int, default=64, help="widest encoder conv layer")
    g.add_argument("--dec-channels", type=_positive_int, default=128, help="widest decoder layer (the paper's 128)")
    g.add_argument("--hidden", type=_positive_int, default=32, help="hidden units of the q_C dense nets")
    g.add_argument(
        "--prior-samples",
        type=_positive_int,
        default=None,
        help="prior samples per MMD estimate, at least 2, modes taken in turn (default: batch size x K)",
    )
    g.add_argument(
        "--qc-input",
        choices=("pixels", "features"),
        default="pixels",
        help="what the per-mode q_C dense nets read: pixels, or the q_D conv features",
    )
    g.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="channels_last memory format for the convs (auto: on for CPU)",
    )
    g.add_argument("--adam-beta1", type=_nonneg_float, default=0.5)
    g.add_argument(
        "--pretrain-steps",
        type=_nonneg_int,
        default=200,
        help="steps matching the q_C nets to the prior moments (skipped with --init-from)",
    )
    g = p.add_argument_group("logging / evaluation")
    g.add_argument("--log-every", type=_positive_int, default=10)
    g.add_argument("--eval-every", type=_positive_int, default=200)
    g.add_argument("--ckpt-every", type=_positive_int, default=100)
    g.add_argument(
        "--eval-recon", type=_positive_int, default=500, help="test images used for recon L2 / Bernoulli NLL / MMD"
    )
    g.add_argument("--train-subset", type=_positive_int, default=None, help="use only N training images")
    g.add_argument("--test-subset", type=_positive_int, default=None, help="evaluate on only N test images")
    g.add_argument("--no-kmeans", action="store_true", help="skip the k-means-on-pixels baseline")
    g.add_argument("--no-figures", action="store_true")
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (by default a tqdm bar when stderr is a terminal, otherwise plain lines)",
    )
    g.add_argument(
        "--progress-seconds",
        type=_nonneg_float,
        default=30.0,
        metavar="S",
        help="without a terminal: at most one progress line per S seconds, at --log-every steps (and at "
        "the first and last step)",
    )
    g.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    g = p.add_argument_group("data-parallel (torchrun --nproc_per_node=R -m gmwae_fast.train ...; see train/dist.py)")
    g.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=600.0,
        metavar="S",
        help="with several ranks: a collective that waits longer than S seconds for another rank (failed, "
        "killed or stuck) ends this rank with exit status 4; it must exceed rank 0's evaluation time",
    )
    g.add_argument(
        "--bn-shards",
        type=_positive_int,
        default=1,
        metavar="S",
        help="one process only: batch-norm statistics over S equal shards of each batch (only shard 0 "
        "updates the running statistics), which is what an S-rank data-parallel run on CPU computes; "
        "for checking such a run against one process",
    )
    p.add_argument("--debug-nan-at-step", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-interrupt-at-step", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-nan-weight-at-step", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-kill-at-step", type=_rank_step, default=None, help=argparse.SUPPRESS)  # RANK:STEP
    return p


def explicit_options(argv: List[str]) -> Set[str]:
    """The option names (dests) given explicitly in ``argv``."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def apply_recipe(a: argparse.Namespace, explicit: Set[str]) -> None:
    """Sets the options of ``RECIPES[a.recipe]`` that were not given explicitly (in place)."""
    for dest, value in RECIPES[a.recipe].items():
        if dest not in explicit:
            setattr(a, dest, value(a) if callable(value) else value)


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
    if a.batch_size < 2:
        p.error("--batch-size must be at least 2 (the networks' batch norm needs 2 images per batch)")
    if a.prior_samples is not None and a.prior_samples < 2:
        p.error("--prior-samples must be at least 2 (the unbiased MMD needs 2 prior samples)")
    for opt in ("test_subset", "eval_recon"):
        if getattr(a, opt) is not None and getattr(a, opt) < 2:
            p.error(f"--{opt.replace('_', '-')} must be at least 2 (the evaluation's MMD needs 2 images)")
    if a.train_subset is not None and a.train_subset < a.batch_size:
        p.error(f"--train-subset ({a.train_subset}) must be >= --batch-size ({a.batch_size})")
    _check_parallel(p, a)


def _check_parallel(p: argparse.ArgumentParser, a) -> None:
    try:
        world = dp.env_world_size()
    except ValueError as e:
        p.error(str(e))
    if world > 1 and a.bn_shards > 1:
        p.error(
            f"--bn-shards is for one process; this is rank {os.environ.get('RANK', '?')} of {world} (a "
            f"data-parallel run on CPU already computes batch norm per rank)"
        )
    parts = max(world, a.bn_shards)
    if a.batch_size // parts < 2:
        what = f"{world} ranks" if world > 1 else f"--bn-shards {a.bn_shards}"
        p.error(
            f"--batch-size {a.batch_size} split over {what} leaves a shard with fewer than 2 images (batch norm "
            f"needs 2); use a batch of at least {2 * parts}"
        )


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
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class RunError(RuntimeError):
    """A problem with the inputs or the environment found while running: one ``error:`` line, exit status 2."""


#: The options that fix the networks' shapes (latent_dim resolved to the prior's dimension).
ARCH_OPTIONS = ("modes", "latent_dim", "enc_channels", "dec_channels", "hidden", "qc_input")


def _parser_defaults() -> Dict:
    return _config(build_parser().parse_args([]))


def config_changes(saved: Dict, now: Dict) -> Dict[str, List]:
    """{option: [checkpoint's value, current value]} for each current option whose value differs from the
    checkpoint's config (an option an older checkpoint lacks counts as having its default)."""
    defaults = _parser_defaults()
    out = {}
    for k in sorted(now):
        if k in _NOT_COMPARED or k.startswith("debug_"):
            continue
        old = saved.get(k, defaults.get(k))
        if old != now[k]:
            out[k] = [old, now[k]]
    return out


def _arch(cfg: Dict) -> Dict:
    c = {**_parser_defaults(), **cfg}
    d = make_prior(c["prior"], c["modes"], c["sigma0"], c["latent_dim"]).d
    return {k: (d if k == "latent_dim" else c[k]) for k in ARCH_OPTIONS}


def arch_differences(saved: Dict, now: Dict) -> List[str]:
    """``--option X in the checkpoint, Y now`` for each option of ``ARCH_OPTIONS`` whose value differs."""
    a, b = _arch(saved), _arch(now)
    return [_describe(k, a[k], b[k]) for k in ARCH_OPTIONS if a[k] != b[k]]


def _describe(key: str, old, new) -> str:
    return f"--{key.replace('_', '-')} {old} in the checkpoint, {new} now"


@dataclass
class _Run:
    """Everything one training run holds (the trainer's functions read and update it)."""

    a: argparse.Namespace
    device: torch.device
    out: Path
    ops: Any = None
    prior: Any = None
    model: Any = None
    opt: Any = None
    gen: Any = None
    batcher: Any = None
    data: Tuple = ()
    step: int = 0
    wall_prev: float = 0.0
    wall: float = 0.0
    last_eval: Optional[Dict] = None
    saved_step: Optional[int] = None  # step of the checkpoint this run wrote or resumed from
    mmd_backend_used: str = ""  # what the registry resolves before the first step (summary: last_backend)
    reparam_backend_used: str = ""
    env: Optional[dp.DistEnv] = None  # the process group of a data-parallel run (None: one process)
    shards: Any = None  # dp.Shards: this process's rows of each global batch
    step_fn: Any = None  # local rows -> loss dict (through DDP when data-parallel)
    batch_norm: str = "batch"  # how batch norm is computed: batch, per-shard, per-rank or sync

    @property
    def is_main(self) -> bool:
        return self.env is None or self.env.is_main

    @property
    def world(self) -> int:
        return 1 if self.env is None else self.env.world

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / ck.CKPT_NAME

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


def main(argv: Optional[list] = None) -> int:
    """``python -m gmwae_fast.train``. Returns 0, 2 (a clear ``error:`` line: unusable data, checkpoint, output
    directory, backend or resume options), EXIT_DIVERGED (3), dist.EXIT_PEER_FAILED (4: data-parallel, a collective
    failed or timed out) or EXIT_INTERRUPTED (130); invalid options exit 2 through argparse. Under torchrun
    (WORLD_SIZE > 1) it joins the process group first and leaves it before returning."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser.parse_args(argv)
    apply_recipe(a, explicit_options(argv))
    _check_args(parser, a)
    out = Path(a.out or f"runs/{a.model}_{a.prior}_seed{a.seed}")
    if a.resume and os.environ.get("RANK", "0") == "0" and not (out / "checkpoints" / ck.CKPT_NAME).is_file():
        parser.error(f"--resume: no checkpoint at {out / 'checkpoints' / ck.CKPT_NAME}")
    kind = "cuda" if (a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())) else "cpu"
    env, failed = None, True
    try:
        env = _init_env(kind, a.dist_timeout)
        rc = _main(a, out, env, kind)
        failed = False
        return rc
    except (RunError, ck.CheckpointError, MissingDataError, InvalidDataError, OSError) as e:
        print(f"error: {_rank_prefix(env)}{e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if env is None:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"error: {_rank_prefix(env)}a collective operation failed or timed out ({type(e).__name__}: {first}); "
            f"another rank probably failed, was killed or is stuck (--dist-timeout {a.dist_timeout:g} s). "
            f"Rank 0 keeps the last complete checkpoint; continue with --resume",
            file=sys.stderr,
        )
        return dp.EXIT_PEER_FAILED
    finally:
        dp.shutdown(env, failed)


def _init_env(kind: str, timeout: float) -> Optional[dp.DistEnv]:
    try:
        return dp.init_distributed(kind, timeout)
    except (ValueError, RuntimeError) as e:
        raise RunError(
            f"could not join the data-parallel process group ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0]})"
        ) from e


def _rank_prefix(env: Optional[dp.DistEnv]) -> str:
    return "" if env is None else f"rank {env.rank} of {env.world}: "


def _main(a, out: Path, env: Optional[dp.DistEnv], kind: str) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(f"cuda:{env.local_rank}" if env is not None and kind == "cuda" else kind)
    r = _Run(a, device, out, env=env)
    _on_main(r, lambda: _prepare_out(r))
    saved = dp.broadcast_object(env, _on_main(r, lambda: _load_for_resume(r))) if a.resume else None
    _resolve_ops(r)
    _load_data(r)
    _build(r)
    try:
        if saved is None:
            _start(r)
        else:
            _restore(r, *saved)
        _parallelise(r)
        rc = _train_loop(r)
    except TrainingDiverged as e:
        return _diverged(r, e)
    return rc if rc or not r.is_main else _finish(r)


def _on_main(r: _Run, fn):
    """``fn()`` on rank 0 only (its result there, None elsewhere); an error it raises there is raised on every rank,
    so that no rank waits for a rank 0 that has stopped."""
    error, result = None, None
    if r.is_main:
        try:
            result = fn()
        except (RunError, ck.CheckpointError, OSError) as e:
            error = e
    if r.env is None:
        if error is not None:
            raise error
        return result
    message = dp.broadcast_object(r.env, None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise RunError(f"rank 0 stopped: {message}")
    return result


def _parallelise(r: _Run) -> None:
    """The shards of every batch this process computes and the step function (DDP on several ranks)."""
    a = r.a
    loss_fn = _make_loss_fn(a, r.prior, r.gen, r.ops, a.prior_samples or a.batch_size * a.modes)
    if r.env is None:
        r.shards = dp.Shards.single(a.batch_size, a.bn_shards)
        r.batch_norm = "per-shard" if a.bn_shards > 1 else "batch"
        r.step_fn = lambda x: loss_fn(r.model, x, r.shards)
        return
    r.shards = dp.Shards.of_rank(a.batch_size, r.env.world, r.env.rank, r.env.group)
    r.model, r.batch_norm = dp.sync_batchnorm(r.model, r.env, r.device)
    ddp = dp.wrap_ddp(_LossModule(r.model, loss_fn, r.shards), r.env, r.device)
    r.step_fn = ddp


class _LossModule(torch.nn.Module):
    """The networks and the loss as one module, so that DDP sees the whole step's forward."""

    def __init__(self, model: torch.nn.Module, loss_fn, shards):
        super().__init__()
        self.model, self.loss_fn, self.shards = model, loss_fn, shards

    def forward(self, x: torch.Tensor) -> Dict:
        return self.loss_fn(self.model, x, self.shards)


def _prepare_out(r: _Run) -> None:
    """Creates --out/checkpoints, checks that it is writable, removes temporaries of killed checkpoint writes."""
    if r.out.exists() and not r.out.is_dir():
        raise RunError(f"--out {r.out} exists and is not a directory")
    try:
        r.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=r.ckpt_path.parent) as f:
            f.write(b"probe")
    except OSError as e:
        raise RunError(f"--out {r.out} is not a writable directory ({e.strerror or e})") from e
    n = ck.remove_stale_temporaries(r.ckpt_path)
    if n:
        print(
            f"removed {n} temporary file(s) of interrupted checkpoint writes in {r.ckpt_path.parent}", file=sys.stderr
        )


def _load_for_resume(r: _Run) -> Tuple[Dict, Dict]:
    """The verified checkpoint and the option changes it is resumed with; RunError for changes not allowed."""
    st = ck.load_checkpoint(r.ckpt_path, map_location=r.device if r.env is None else "cpu")  # sent to every rank
    if not all(k in st for k in ("model", "optimizer", "rng", "step", "config")):
        raise ck.CheckpointError(
            f"{r.ckpt_path} is not a trainer checkpoint (it lacks the model, optimizer, rng, step or config entry)"
        )
    now = _config(r.a)
    arch = arch_differences(st["config"], now)
    if arch:
        raise RunError(f"--resume: the checkpoint's networks have other sizes: {'; '.join(arch)}")
    changes = config_changes(st["config"], now)
    if st.get("world_size", 1) != r.world:  # per-rank batch norm on CPU: the ranks change what a step computes
        changes["world_size"] = [st.get("world_size", 1), r.world]
    forced = [k for k in changes if k not in RESUME_MAY_CHANGE]
    if forced and not r.a.allow_config_change:
        raise RunError(
            f"--resume: {r.ckpt_path} was written with other options: "
            + "; ".join(
                _describe(k, *changes[k])
                if k != "world_size"
                else f"{changes[k][0]} rank(s) in the checkpoint, {changes[k][1]} now"
                for k in forced
            )
            + ". Pass the checkpoint's values, or --allow-config-change to continue with the new ones"
        )
    return st, changes


def _resolve_ops(r: _Run) -> None:
    try:
        r.ops = resolve_ops()
    except RuntimeError as e:
        raise RunError(str(e)) from e
    for opt, op in (("mmd_backend", "imq_mmd"), ("reparam_backend", "gm_reparam")):
        requested = getattr(r.a, opt)
        try:
            used = resolve_backend(requested, r.device, op)
        except (RuntimeError, ValueError) as e:
            raise RunError(f"--{opt.replace('_', '-')} {requested}: {e}") from e
        setattr(r, opt + "_used", used)


def _load_data(r: _Run) -> None:
    a = r.a
    x_tr, y_tr, x_te, y_te = load_mnist(a.data_dir or default_data_dir(), download=not a.no_download)
    x_tr, y_tr = subset(x_tr, y_tr, a.train_subset, a.seed)
    x_te, y_te = subset(x_te, y_te, a.test_subset, 0)
    if a.batch_size > len(x_tr):
        raise RunError(f"--batch-size {a.batch_size} exceeds the number of training images ({len(x_tr)})")
    if len(x_te) < 2:
        raise RunError(f"the evaluation needs at least 2 test images, the data has {len(x_te)}")
    r.data = (x_tr.to(r.device), y_tr, x_te.to(r.device), y_te)


def _build(r: _Run) -> None:
    a = r.a
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    r.gen = torch.Generator(device=r.device).manual_seed(a.seed)
    prior, model = prior_and_model(vars(a))
    r.prior, model = prior.to(r.device), model.to(r.device)
    model.encoder.init_to_prior(r.prior.means, r.prior.diag_stds)
    if a.channels_last == "on" or (a.channels_last == "auto" and r.device.type == "cpu"):
        model = model.to(memory_format=torch.channels_last)
    r.model = model
    r.batcher = Batcher(r.data[0], r.data[1], a.batch_size, a.seed)


def _adam(r: _Run, params) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=r.a.lr, betas=(r.a.adam_beta1, 0.999))


def _load_weights(r: _Run, state: Dict, source: str) -> None:
    try:
        r.model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise RunError(
            f"{source}: the checkpoint's parameters do not fit this network "
            f"({first[-1].strip() if first else type(e).__name__})"
        ) from e


def _start(r: _Run) -> None:
    """A fresh run: initial weights (--init-from, or the q_C pretraining), Adam, and the step-0 checkpoint. With
    several ranks rank 0 does it and DDP copies its weights to the others."""
    _on_main(r, lambda: _initial_weights(r))
    r.opt = _adam(r, r.model.parameters())
    if r.is_main:
        _save(r, 0.0)


def _initial_weights(r: _Run) -> None:
    a = r.a
    if r.metrics_path.exists():
        r.metrics_path.unlink()
    if a.init_from:
        st = ck.load_checkpoint(a.init_from, map_location=r.device)
        if isinstance(st.get("config"), dict):
            arch = arch_differences(st["config"], _config(a))
            if arch:
                raise RunError(f"--init-from {a.init_from}: its networks have other sizes: {'; '.join(arch)}")
        _load_weights(r, st["model"] if "model" in st else st, f"--init-from {a.init_from}")
    elif a.pretrain_steps:
        _pretrain(r)


def _pretrain(r: _Run) -> None:
    a = r.a
    popt = _adam(r, r.model.encoder.parameters())
    pb = Batcher(r.data[0], r.data[1], a.batch_size, a.seed + 7919)
    for i in range(a.pretrain_steps):
        x, _ = pb.batch(i)
        loss = pretrain_loss(r.model, x, r.prior)
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()
    _append_jsonl(
        r.metrics_path,
        {"kind": "pretrain", "step": 0, "pretrain_steps": a.pretrain_steps, "pretrain_loss": loss.item()},
    )


def _restore(r: _Run, st: Dict, changes: Dict) -> None:
    """Continues from the verified checkpoint ``st``; option ``changes`` go to metrics.jsonl as a resume record."""
    _load_weights(r, st["model"], f"--resume {r.ckpt_path}")
    r.opt = _adam(r, r.model.parameters())
    r.opt.load_state_dict(st["optimizer"])
    for group in r.opt.param_groups:
        group["betas"] = (r.a.adam_beta1, 0.999)  # the lr is set before every step (lr_at)
    ck.set_rng_state(st["rng"], r.gen)
    r.step, r.wall_prev, r.last_eval = st["step"], st.get("wall_s", 0.0), st.get("last_eval")
    r.saved_step = r.step
    if not r.is_main:
        return
    _truncate_metrics(r.metrics_path, r.step)
    if changes:
        forced = [k for k in changes if k not in RESUME_MAY_CHANGE]
        _append_jsonl(
            r.metrics_path,
            {"kind": "resume", "step": r.step, "config_changes": changes, "allowed_by_allow_config_change": forced},
        )
    print(f"resumed from {r.ckpt_path} at step {r.step}", file=sys.stderr)


def _one_step(r: _Run) -> Tuple[torch.Tensor, Dict, float]:
    """One optimiser step; TrainingDiverged (before the update) when the loss is not finite."""
    a = r.a
    x, _ = r.batcher.batch(r.step)
    res = r.step_fn(x[r.shards.first : r.shards.end])
    loss = res["loss"]  # the global batch's loss, the same on every rank
    if a.debug_nan_at_step is not None and r.step + 1 == a.debug_nan_at_step:
        loss = loss * float("nan")
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {r.step + 1}", r.step + 1)
    r.opt.zero_grad(set_to_none=True)
    objective(res).backward()  # with DDP: gradients averaged over the ranks
    lr = lr_at(r.step, a)
    for group in r.opt.param_groups:
        group["lr"] = lr
    r.opt.step()
    r.step += 1
    if a.debug_nan_weight_at_step == r.step:
        with torch.no_grad():
            next(r.model.parameters()).fill_(float("nan"))
    return loss, res, lr


def _train_loop(r: _Run) -> int:
    """Steps up to --steps with logging, evaluation and checkpoints; 0, or EXIT_INTERRUPTED after a Ctrl-C."""
    a = r.a
    t0 = time.perf_counter()
    prog = make_progress(a, r.step) if r.is_main else None
    r.model.train()
    try:
        with _Stop() as stop:
            while r.step < a.steps:
                loss, res, lr = _one_step(r)
                if a.debug_interrupt_at_step is not None and r.step == a.debug_interrupt_at_step:
                    stop.requested = True  # behaves exactly like a first Ctrl-C after this step
                if a.debug_kill_at_step == ((r.env.rank if r.env else 0), r.step):
                    os.kill(os.getpid(), signal.SIGKILL)  # a rank dying without any cleanup (tests)
                stop.requested = dp.agree_any(r.env, stop.requested, r.device)  # every rank stops at one step
                last = r.step == a.steps
                due_eval = r.step % a.eval_every == 0 or last
                due_ckpt = r.step % a.ckpt_every == 0 or last or stop.requested
                if due_eval or due_ckpt:
                    _require_finite(r)
                if r.is_main:
                    _report(r, res, lr, loss, prog, due_eval, due_ckpt, t0)
                if stop.requested:
                    break
    finally:
        if prog:
            prog.close()
    r.wall = r.wall_prev + time.perf_counter() - t0
    if stop.requested:
        print(
            f"interrupted at step {r.step}; checkpoint saved to {r.ckpt_path} (continue with --resume)", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    return 0


def _report(r: _Run, res: Dict, lr: float, loss: torch.Tensor, prog, due_eval: bool, due_ckpt: bool, t0: float) -> None:
    """Rank 0's part of a step: the train log, the evaluation, the progress line and the checkpoint."""
    if r.step % r.a.log_every == 0 or r.step == r.a.steps:
        _log_train(r, res, lr)
    if due_eval:
        _evaluate_now(r)
    if prog:
        prog.update(r.step, loss.item(), r.last_eval)
    if due_ckpt:
        _save(r, r.wall_prev + time.perf_counter() - t0)


def _log_train(r: _Run, res: Dict, lr: float) -> None:
    a = r.a
    rec = {
        "kind": "train",
        "step": r.step,
        "epoch": round(r.batcher.epoch_of(r.step), 4),
        "lr": lr,
        **{k: float(v.detach()) for k, v in res.items() if k not in ("pi", "logits") and not k.startswith("_")},
    }
    pi = res["pi"]
    rec["batch_active_modes"] = int((torch.bincount(pi.argmax(1), minlength=a.modes) >= max(1, 0.01 * len(pi))).sum())
    if a.mode_prune > 0:
        rec["decoded_modes"] = decodes_per_image(pi, a.mode_prune)
    _append_jsonl(r.metrics_path, rec)


def _evaluate_now(r: _Run) -> None:
    x_te, y_te = r.data[2], r.data[3]
    r.last_eval = dict(_eval(r.model, x_te, y_te, r.prior, r.ops, r.a), step=r.step)
    _append_jsonl(
        r.metrics_path,
        {
            "kind": "eval",
            "step": r.step,
            "epoch": round(r.batcher.epoch_of(r.step), 4),
            **{k: v for k, v in r.last_eval.items() if k not in ("heatmap", "class_to_mode", "step")},
        },
    )


def _require_finite(r: _Run) -> None:
    """TrainingDiverged when a parameter, buffer or Adam moment holds a NaN or an infinity."""
    bad = next(ck.nonfinite_entries({"model": r.model.state_dict(), "optimizer": r.opt.state_dict()}), None)
    if bad is not None:
        raise TrainingDiverged(f"non-finite values in {bad} after step {r.step}", r.step)


def _save(r: _Run, wall: float) -> None:
    """Checkpoints the run (never with non-finite values: TrainingDiverged); a failed write is a RunError that
    says which checkpoint is kept."""
    _require_finite(r)
    state = {
        "model": r.model.state_dict(),
        "optimizer": r.opt.state_dict(),
        "rng": ck.rng_state(r.gen),
        "step": r.step,
        "wall_s": wall,
        "last_eval": r.last_eval,
        "config": _config(r.a),
        "world_size": r.world,
    }
    try:
        ck.atomic_save(state, r.ckpt_path)
    except OSError as e:
        kept = (
            f"the checkpoint of step {r.saved_step} is kept"
            if r.saved_step is not None
            else "no checkpoint of this run was written"
        )
        raise RunError(
            f"could not write the checkpoint {r.ckpt_path} at step {r.step} ({e.strerror or e}); {kept}"
        ) from e
    r.saved_step = r.step


def _diverged(r: _Run, e: TrainingDiverged) -> int:
    if r.saved_step is not None:
        where = (
            f"The last good checkpoint is kept at {r.ckpt_path} (step {r.saved_step}); lower --lr/--lam "
            f"or resume from it with --resume."
        )
    else:
        where = "No checkpoint of this run was written; lower --lr/--lam."
    msg = f"{e}; training stopped. {where}"
    if r.is_main:  # every rank sees the same global loss and stops at the same step
        print(f"error: {msg}", file=sys.stderr)
        _append_jsonl(r.metrics_path, {"kind": "diverged", "step": e.step, "message": msg})
    return EXIT_DIVERGED


def _finish(r: _Run) -> int:
    """Final evaluation (if not just done), summary.json, k-means baseline and figures."""
    a, step = r.a, r.step
    x_tr, _, x_te, y_te = r.data
    if r.last_eval is None or r.last_eval.get("step") != step:  # e.g. --resume with --steps <= the saved step
        _evaluate_now(r)
    summary = {
        k: r.last_eval[k]
        for k in (
            "test_accuracy",
            "active_modes",
            "usage_kl",
            "recon_l2",
            "bernoulli_nll",
            "mmd",
            "mode_usage",
            "class_to_mode",
        )
    }
    summary.update(
        {
            "model": a.model,
            "prior": a.prior,
            "recipe": a.recipe,
            "steps": step,
            "epochs": round(r.batcher.epoch_of(step), 3),
            "wall_s": round(r.wall, 2),
            "sec_per_step": round(r.wall / max(step, 1), 4),
            "device": str(r.device),
            "mmd_backend": last_backend("imq_mmd") or r.mmd_backend_used,
            "mmd_backend_requested": a.mmd_backend,
            "reparam_backend": last_backend("gm_reparam") or r.reparam_backend_used,
            "reparam_backend_requested": a.reparam_backend,
            "config": _config(a),
            "machine": _machine_info(r.device),
            "train_images": len(x_tr),
            "test_images": len(x_te),
            "world_size": r.world,
            "dist_backend": None if r.env is None else r.env.backend,
            "batch_norm": r.batch_norm,
        }
    )
    if not a.no_kmeans:
        t = time.perf_counter()
        summary["kmeans_accuracy"] = kmeans_baseline(x_tr.cpu(), x_te.cpu(), y_te.cpu(), a.modes, seed=a.seed)
        summary["kmeans_wall_s"] = round(time.perf_counter() - t, 2)
        r.last_eval = dict(r.last_eval, kmeans_accuracy=summary["kmeans_accuracy"])
    (r.out / "summary.json").write_text(json.dumps(summary, indent=2))
    fig_dir = r.out / "figures"
    if not a.no_figures:
        from .figures import make_all_figures

        make_all_figures(r.model, r.prior, x_te, y_te, r.last_eval, r.metrics_path, fig_dir, r.ops, a)
    print(
        f"test accuracy {summary['test_accuracy']:.4f}, active modes {summary['active_modes']}/{a.modes}"
        + (f", k-means {summary['kmeans_accuracy']:.4f}" if "kmeans_accuracy" in summary else "")
        + f"; {step} steps in {r.wall:.1f}s on {r.device}"
    )
    print(f"summary: {r.out / 'summary.json'}")
    if not a.no_figures:
        print(f"figures: {fig_dir}/")
    return 0


class _LineProgress:
    """Progress as plain lines (stderr not a terminal: CI and nohup logs): the first and last step, and the
    --log-every steps at least --progress-seconds apart."""

    def __init__(self, a, step: int, stream):
        self.a, self.stream, self.start = a, stream, step
        self.t0, self.last = time.perf_counter(), -math.inf

    def update(self, step: int, loss: float, last_eval: Optional[Dict]) -> None:
        a, now = self.a, time.perf_counter()
        due = step % a.log_every == 0 and now - self.last >= a.progress_seconds
        if not (due or step in (self.start + 1, a.steps)):
            return
        self.last = now
        per_step = (now - self.t0) / max(step - self.start, 1)
        text = f"{a.model} step {step}/{a.steps}: loss {loss:.4f}"
        if last_eval:
            text += (
                f", test accuracy {last_eval['test_accuracy']:.4f}, active modes "
                f"{last_eval['active_modes']}/{a.modes} (step {last_eval.get('step', '?')})"
            )
        left = int(per_step * (a.steps - step))
        text += f"; {per_step:.3f} s/step, {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left"
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _BarProgress:
    """A tqdm bar with the loss and the latest accuracy / active modes (stderr is a terminal)."""

    def __init__(self, a, step: int, stream):
        from tqdm import tqdm

        self.bar = tqdm(total=a.steps, initial=step, desc=a.model, dynamic_ncols=True, file=stream)

    def update(self, step: int, loss: float, last_eval: Optional[Dict]) -> None:
        post = {"loss": f"{loss:.3f}"}
        if last_eval:
            post["acc"] = f"{last_eval['test_accuracy']:.3f}"
            post["modes"] = last_eval["active_modes"]
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def make_progress(a, step: int, stream=None):
    """None with --no-progress; else a tqdm bar when ``stream`` (default stderr) is a terminal, plain lines if not."""
    stream = sys.stderr if stream is None else stream
    if a.no_progress:
        return None
    isatty = getattr(stream, "isatty", None)
    return (_BarProgress if isatty is not None and isatty() else _LineProgress)(a, step, stream)


def _eval(model, x_te, y_te, prior, ops, a):
    return evaluate(
        model,
        x_te,
        y_te,
        prior,
        ops,
        backend=a.mmd_backend,
        reparam_backend=a.reparam_backend,
        n_recon=a.eval_recon,
        seed=a.seed + 1234,
    )


def _make_loss_fn(a, prior, gen, ops, n_prior):
    """``fn(model, x, shards)``: the loss dict of this process's rows ``x`` of a step's global batch."""
    if a.model == "gmwae":

        def base(model, x, sh):
            return gmwae_loss(
                model,
                x,
                prior,
                gen,
                ops,
                a.lam,
                n_prior,
                a.mmd_backend,
                a.reparam_backend,
                a.recon_scale,
                a.mode_prune,
                shards=sh,
            )
    else:

        def base(model, x, sh):
            return gmvae_loss(model, x, prior, gen, ops, a.beta, a.reparam_backend, a.mode_prune, shards=sh)

    warp = AffineRange(a.aug_rotate, a.aug_shear, a.aug_scale, a.aug_translate)

    def fn(model, x, sh):
        res = base(model, x, sh)
        if a.consistency:
            res = add_consistency(res, model, x, gen, a.consistency, warp, shards=sh)
        if a.balance:
            res = add_balance(res, a.balance, shards=sh)
        return {k: v for k, v in res.items() if k not in ("_terms", "_parts")}

    return fn
