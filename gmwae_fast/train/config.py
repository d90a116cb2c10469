"""The trainer's options: :class:`TrainConfig`, one typed field per command-line option.

Each field's ``metadata["cli"]`` (an :class:`Opt`) holds what the command line needs (help text, parser, choices,
group); ``cli.build_parser`` derives the argparse options from them, so a new trainer option is one field here and
the code that reads it. The field order is the order of ``--help`` and of the saved ``config`` dict.

    cfg = TrainConfig.from_args(build_parser().parse_args(argv), explicit_options(argv))  # recipe applied
    cfg.validate(world=1)                                                                   # ConfigError if not
    cfg.to_dict()   # what the checkpoint and summary.json record as "config" (every option but the debug_* ones)

``--recipe NAME`` (:data:`RECIPES`) fills in the options not given explicitly; ``--resume`` refuses options that
differ from the checkpoint's (:func:`config_changes`) except those in :data:`RESUME_MAY_CHANGE`, and always refuses
other network sizes (:func:`arch_differences`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from gmwae_fast.backends import backend_choices, check_backend_name

from .models import GMModel
from .priors import PRIORS, GMPrior, make_prior


class ConfigError(ValueError):
    """Option values that cannot train together; the command line reports it as an argparse error (exit 2)."""


# -------------------------------------------------------------------------------------------- value parsers
def _number(conv: Callable, ok: Callable, what: str, bad_range: Optional[str] = None) -> Callable[[str], Any]:
    """An argparse ``type``: ``conv(s)`` if it parses and ``ok`` holds, else an error naming what was expected."""

    def parse(s: str):
        try:
            v = conv(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {bad_range or what}, got {s!r}")
        return v

    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number", "a positive finite number")
_nonneg_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0", "a finite number >= 0")


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


# -------------------------------------------------------------------------------------------- recipes, resume
#: Option bundles for ``--recipe``: option -> value, or a function of the config. "paper" changes nothing;
#: "robust-ema" is "robust" evaluated on a weight average and with a constant learning rate instead of the anneal,
#: and the reconstruction cost doubled against the q_D terms and the MMD (--recon-scale 2).
_ROBUST_Q_D = {"consistency": 50.0, "balance": 100.0, "mode_prune": 1e-4}
RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "robust": {**_ROBUST_Q_D, "lr_decay_from": lambda c: int(0.75 * c.steps), "lr_final": 0.0},
    "robust-ema": {**_ROBUST_Q_D, "ema": 0.999, "recon_scale": 2.0},
}
#: Options that may differ from the checkpoint's on --resume (they do not change what the run computes, or
#: change only its length and the end of its learning-rate schedule; --ema changes only what is evaluated).
RESUME_MAY_CHANGE = (
    "steps",
    "lr_decay_from",
    "lr_final",
    "ema",
    "stop_at",
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
NOT_COMPARED = ("resume", "allow_config_change", "init_from")
#: The options that fix the networks' shapes (latent_dim resolved to the prior's dimension).
ARCH_OPTIONS = ("modes", "latent_dim", "enc_channels", "dec_channels", "hidden", "qc_input")


def flag_name(option: str) -> str:
    """``lr_decay_from`` -> ``--lr-decay-from``."""
    return "--" + option.replace("_", "-")


def recipes_help() -> str:
    """The ``--help`` epilog listing every recipe's options."""

    def show(v):
        return "0.75*steps" if callable(v) else f"{v:g}"

    lines = ["recipes (--recipe; an option given on the command line overrides the recipe's value):"]
    width = max(map(len, RECIPES))
    for name, opts in RECIPES.items():
        body = " ".join(f"{flag_name(k)} {show(v)}" for k, v in opts.items())
        lines.append(f"  {name:{width}s} {body or 'the paper objective and settings: changes nothing'}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class Opt:
    """How a :class:`TrainConfig` field appears on the command line: ``--field-name`` with this help text
    (``None``: none), value parser, choices, metavar and ``--help`` group (``""``: the top level); ``flag``: a
    ``store_true`` switch; ``hidden``: not listed by ``--help`` (test hooks)."""

    help: Optional[str] = None
    parse: Optional[Callable[[str], Any]] = None
    choices: Optional[Tuple[str, ...]] = None
    metavar: Optional[str] = None
    group: str = ""
    flag: bool = False
    hidden: bool = False


def _opt(default: Any, help: Optional[str] = None, **kw: Any) -> Any:
    return field(default=default, metadata={"cli": Opt(help, **kw)})


_REG = "q_D regularisers (beyond the paper; off by default)"
_MODEL = "model"
_LOG = "logging / evaluation"
_DIST = "data-parallel (torchrun --nproc_per_node=R -m gmwae_fast.train ...; see train/dist.py)"


@dataclass(frozen=True)
class TrainConfig:
    """Every trainer option (the dest of ``--option-name``), with the command line's defaults."""

    model: str = _opt("gmwae", choices=("gmwae", "gmvae"))
    prior: str = _opt("simplex", choices=PRIORS)
    dataset: str = _opt("mnist", choices=("mnist",))
    data_dir: Optional[str] = _opt(None, "directory holding MNIST/raw (default: $GMWAE_DATA, else ./data)")
    no_download: bool = _opt(False, "never try to download MNIST", flag=True)
    recipe: str = _opt(
        "paper",
        "a bundle of defaults (see the recipes below); options given explicitly override it",
        choices=tuple(RECIPES),
    )
    steps: int = _opt(
        600,
        "training steps after pretraining (the paper's 20 epochs are 12000 steps at batch 100)",
        parse=_positive_int,
    )
    batch_size: int = _opt(100, "images per step, at least 2 (the paper's 100)", parse=_positive_int)
    lr: float = _opt(5e-4, parse=_positive_float)
    lr_decay_from: Optional[int] = _opt(
        None,
        "from this step on, the learning rate falls along a half cosine from --lr to --lr-final "
        "at --steps (default: constant --lr; --recipe robust: 0.75 * --steps). Set it when resuming "
        "to anneal a finished run.",
        parse=_nonneg_int,
        metavar="STEP",
    )
    lr_final: float = _opt(0.0, "learning rate at --steps with --lr-decay-from", parse=_nonneg_float)
    ema: float = _opt(
        0.0,
        "evaluate and deliver an exponential moving average of the weights, updated after every step with this "
        "decay (e.g. 0.999; train/ema.py); training itself is unchanged. 0 = off",
        parse=_nonneg_float,
        metavar="DECAY",
    )
    stop_at: Optional[int] = _opt(
        None,
        "pause after this step (evaluation and checkpoint written, exit 0, no final summary); --resume with a "
        "later --stop-at or none continues the same run, schedule unchanged (runs in slices; "
        "python -m gmwae_fast.train.select)",
        parse=_positive_int,
        metavar="STEP",
    )
    lam: float = _opt(500.0, "MMD weight (GM-WAE)", parse=_nonneg_float)
    recon_scale: float = _opt(
        1.0,
        "GM-WAE cost c(x,y) = recon_scale * ||x-y||^2 (1: the paper's squared L2; the WAE code's l2sq cost is 0.05)",
        parse=_positive_float,
    )
    beta: float = _opt(1.0, "weight of the KL terms (GM-VAE)", parse=_nonneg_float)
    mode_prune: float = _opt(
        0.0,
        "decode only the modes with q_D(k|x) > EPS (and the most likely one) and renormalise the "
        "reconstruction expectation over them; 0 decodes all K modes (the exact objective)",
        parse=_nonneg_float,
        metavar="EPS",
    )
    consistency: float = _opt(
        0.0,
        "add GAMMA * KL(q_D(.|x) || q_D(.|warp(x))) to the loss, warp a random affine map, no gradient "
        "through the clean view (gmwae_fast/train/augment.py); 0 = the paper's objective",
        parse=_nonneg_float,
        metavar="GAMMA",
        group=_REG,
    )
    balance: float = _opt(
        0.0,
        "add W * KL(batch mean of q_D || uniform) to the loss (losses.add_balance); 0 = off",
        parse=_nonneg_float,
        metavar="W",
        group=_REG,
    )
    aug_rotate: float = _opt(15.0, "rotation U(-DEG, DEG)", parse=_nonneg_float, metavar="DEG", group=_REG)
    aug_shear: float = _opt(0.3, "shear x += s*y, s ~ U(-S, S)", parse=_nonneg_float, group=_REG)
    aug_scale: float = _opt(0.1, "scale U(1-A, 1+A), A < 1", parse=_nonneg_float, group=_REG)
    aug_translate: float = _opt(
        2.0, "translation U(-PX, PX) pixels per axis", parse=_nonneg_float, metavar="PX", group=_REG
    )
    seed: int = _opt(0, parse=_nonneg_int)
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    out: Optional[str] = _opt(None, "output directory (default runs/<model>_<prior>_seed<seed>)")
    resume: bool = _opt(
        False,
        "continue from <out>/checkpoints/last.pt; options that change the run must match the "
        "checkpoint's, except " + ", ".join(flag_name(k) for k in RESUME_MAY_CHANGE),
        flag=True,
    )
    allow_config_change: bool = _opt(
        False,
        "with --resume, accept other differences from the checkpoint's options (recorded in "
        "metrics.jsonl as a 'resume' record); the network sizes must still match",
        flag=True,
    )
    init_from: Optional[str] = _opt(
        None,
        "initialise the networks from a trained checkpoint (e.g. GM-VAE from a GM-WAE)",
        metavar="CKPT",
    )
    mmd_backend: str = _opt("auto", "backend of gmwae_fast.fast_imq_mmd", parse=_backend)
    reparam_backend: str = _opt("auto", "backend of gmwae_fast.gm_reparameterize", parse=_backend)
    modes: int = _opt(10, "K", parse=_positive_int, group=_MODEL)
    latent_dim: Optional[int] = _opt(
        None, "d for the simplex prior (default K; rot2d is always 2)", parse=_positive_int, group=_MODEL
    )
    sigma0: float = _opt(1.0, "simplex prior std (means 4*sigma0 apart)", parse=_positive_float, group=_MODEL)
    enc_channels: int = _opt(64, "widest encoder conv layer", parse=_positive_int, group=_MODEL)
    dec_channels: int = _opt(128, "widest decoder layer (the paper's 128)", parse=_positive_int, group=_MODEL)
    hidden: int = _opt(32, "hidden units of the q_C dense nets", parse=_positive_int, group=_MODEL)
    prior_samples: Optional[int] = _opt(
        None,
        "prior samples per MMD estimate, at least 2, modes taken in turn (default: batch size x K)",
        parse=_positive_int,
        group=_MODEL,
    )
    qc_input: str = _opt(
        "pixels",
        "what the per-mode q_C dense nets read: pixels, or the q_D conv features",
        choices=("pixels", "features"),
        group=_MODEL,
    )
    channels_last: str = _opt(
        "auto",
        "channels_last memory format for the convs (auto: on for CPU)",
        choices=("auto", "on", "off"),
        group=_MODEL,
    )
    adam_beta1: float = _opt(0.5, parse=_nonneg_float, group=_MODEL)
    pretrain_steps: int = _opt(
        200,
        "steps matching the q_C nets to the prior moments (skipped with --init-from)",
        parse=_nonneg_int,
        group=_MODEL,
    )
    log_every: int = _opt(10, parse=_positive_int, group=_LOG)
    eval_every: int = _opt(200, parse=_positive_int, group=_LOG)
    ckpt_every: int = _opt(100, parse=_positive_int, group=_LOG)
    eval_recon: int = _opt(500, "test images used for recon L2 / Bernoulli NLL / MMD", parse=_positive_int, group=_LOG)
    val_size: int = _opt(
        0,
        "hold out N training images as a validation set (a fixed split, the same for every seed): evaluated beside "
        "the test set (val_* metrics) so that choices need not look at the test set; 0: none (use 5000)",
        parse=_nonneg_int,
        group=_LOG,
    )
    train_subset: Optional[int] = _opt(None, "use only N training images", parse=_positive_int, group=_LOG)
    test_subset: Optional[int] = _opt(None, "evaluate on only N test images", parse=_positive_int, group=_LOG)
    no_kmeans: bool = _opt(False, "skip the k-means-on-pixels baseline", flag=True, group=_LOG)
    no_figures: bool = _opt(False, flag=True, group=_LOG)
    no_progress: bool = _opt(
        False,
        "no progress output (by default a tqdm bar when stderr is a terminal, otherwise plain lines)",
        flag=True,
        group=_LOG,
    )
    progress_seconds: float = _opt(
        30.0,
        "without a terminal: at most one progress line per S seconds, at --log-every steps (and at "
        "the first and last step)",
        parse=_nonneg_float,
        metavar="S",
        group=_LOG,
    )
    threads: Optional[int] = _opt(None, "torch.set_num_threads", parse=_positive_int, group=_LOG)
    dist_timeout: float = _opt(
        600.0,
        "with several ranks: a collective that waits longer than S seconds for another rank (failed, "
        "killed or stuck) ends this rank with exit status 4; it must exceed rank 0's evaluation time",
        parse=_positive_float,
        metavar="S",
        group=_DIST,
    )
    bn_shards: int = _opt(
        1,
        "one process only: batch-norm statistics over S equal shards of each batch (only shard 0 "
        "updates the running statistics), which is what an S-rank data-parallel run on CPU computes; "
        "for checking such a run against one process",
        parse=_positive_int,
        metavar="S",
        group=_DIST,
    )
    # test hooks (not listed by --help, not saved): NaN loss / Ctrl-C / NaN weight at a step, kill RANK at STEP
    debug_nan_at_step: Optional[int] = _opt(None, parse=_positive_int, hidden=True)
    debug_interrupt_at_step: Optional[int] = _opt(None, parse=_positive_int, hidden=True)
    debug_nan_weight_at_step: Optional[int] = _opt(None, parse=_positive_int, hidden=True)
    debug_kill_at_step: Optional[Tuple[int, int]] = _opt(None, parse=_rank_step, hidden=True)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, explicit: Optional[Iterable[str]] = None) -> "TrainConfig":
        """The config of parsed options ``ns``; with ``explicit`` (the options given on the command line), ``--recipe``
        applied to the others (:func:`apply_recipe`)."""
        cfg = cls(**vars(ns))
        return cfg if explicit is None else apply_recipe(cfg, explicit)

    def to_dict(self) -> Dict[str, Any]:
        """What the checkpoint and summary.json record as ``config``: every option but the debug hooks."""
        return {k: v for k, v in vars(self).items() if not k.startswith("debug_")}

    @property
    def out_dir(self) -> Path:
        """``--out``, by default ``runs/<model>_<prior>_seed<seed>``."""
        return Path(self.out or f"runs/{self.model}_{self.prior}_seed{self.seed}")

    @property
    def n_prior(self) -> int:
        """Prior samples per MMD estimate (``--prior-samples``, default batch size x K)."""
        return self.prior_samples or self.batch_size * self.modes

    def validate(self, world: int = 1, rank: Any = 0) -> None:
        """ConfigError naming the first option value that cannot work; ``world``: data-parallel ranks, ``rank``:
        this process's (as the message shows it)."""
        for message in _problems(self, world, rank):
            raise ConfigError(message)


def cli_options() -> Iterator[Tuple[str, Any, Opt]]:
    """``(name, default, Opt)`` of every :class:`TrainConfig` field, in order (for ``cli.build_parser``)."""
    for f in dataclasses.fields(TrainConfig):
        yield f.name, f.default, f.metadata["cli"]


def apply_recipe(cfg: TrainConfig, explicit: Iterable[str]) -> TrainConfig:
    """``cfg`` with the options of ``RECIPES[cfg.recipe]`` that are not in ``explicit`` set to the recipe's."""
    opts = RECIPES[cfg.recipe]
    return dataclasses.replace(
        cfg, **{k: (v(cfg) if callable(v) else v) for k, v in opts.items() if k not in set(explicit)}
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of the update that follows ``step`` completed steps (a function of the step alone, so a
    resumed run follows the same schedule): ``--lr`` up to ``--lr-decay-from``, then a half cosine down to
    ``--lr-final`` at ``--steps``."""
    if cfg.lr_decay_from is None or step < cfg.lr_decay_from:
        return cfg.lr
    t = min(1.0, (step - cfg.lr_decay_from) / (cfg.steps - cfg.lr_decay_from))
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * t))


# -------------------------------------------------------------------------------------------- validation
def _problems(c: TrainConfig, world: int, rank: Any) -> Iterator[str]:
    """Every problem of the option values, in the order they are reported."""
    if c.prior == "rot2d" and c.latent_dim not in (None, 2):
        yield "--prior rot2d is 2-dimensional; drop --latent-dim or pass 2"
    if c.prior == "simplex" and c.latent_dim is not None and c.latent_dim < c.modes - 1:
        yield f"--latent-dim must be >= modes-1 = {c.modes - 1} for the simplex prior"
    if c.resume and c.init_from:
        yield "--resume and --init-from are mutually exclusive"
    if c.mode_prune >= 1.0:
        yield f"--mode-prune ({c.mode_prune}) must be below 1 (0 disables it)"
    if c.aug_scale >= 1.0:
        yield f"--aug-scale ({c.aug_scale}) must be below 1"
    if c.lr_decay_from is not None and c.lr_decay_from >= c.steps:
        yield f"--lr-decay-from ({c.lr_decay_from}) must be below --steps ({c.steps})"
    if c.lr_final > c.lr:
        yield f"--lr-final ({c.lr_final}) must not exceed --lr ({c.lr})"
    if c.ema >= 1.0:
        yield f"--ema ({c.ema}) must be below 1 (0 disables the weight average)"
    yield from _size_problems(c)
    yield from _parallel_problems(c, world, rank)


def _size_problems(c: TrainConfig) -> Iterator[str]:
    if c.batch_size < 2:
        yield "--batch-size must be at least 2 (the networks' batch norm needs 2 images per batch)"
    if c.prior_samples is not None and c.prior_samples < 2:
        yield "--prior-samples must be at least 2 (the unbiased MMD needs 2 prior samples)"
    for opt in ("test_subset", "eval_recon"):
        if getattr(c, opt) is not None and getattr(c, opt) < 2:
            yield f"{flag_name(opt)} must be at least 2 (the evaluation's MMD needs 2 images)"
    if c.val_size == 1:
        yield "--val-size must be 0 (no validation set) or at least 2"
    if c.train_subset is not None and c.train_subset < c.batch_size:
        yield f"--train-subset ({c.train_subset}) must be >= --batch-size ({c.batch_size})"


def _parallel_problems(c: TrainConfig, world: int, rank: Any) -> Iterator[str]:
    if world > 1 and c.bn_shards > 1:
        yield (
            f"--bn-shards is for one process; this is rank {rank} of {world} (a "
            f"data-parallel run on CPU already computes batch norm per rank)"
        )
    parts = max(world, c.bn_shards)
    if c.batch_size // parts < 2:
        what = f"{world} ranks" if world > 1 else f"--bn-shards {c.bn_shards}"
        yield (
            f"--batch-size {c.batch_size} split over {what} leaves a shard with fewer than 2 images (batch norm "
            f"needs 2); use a batch of at least {2 * parts}"
        )


# -------------------------------------------------------------------------------------------- checkpoints' configs
def prior_and_model(cfg: Dict) -> Tuple[GMPrior, GMModel]:
    """The prior and a freshly initialised model for a trainer config (:meth:`TrainConfig.to_dict`, or a
    checkpoint's ``config``), on the CPU."""
    prior = make_prior(cfg["prior"], cfg["modes"], cfg["sigma0"], cfg["latent_dim"])
    model = GMModel(cfg["modes"], prior.d, cfg["enc_channels"], cfg["dec_channels"], cfg["hidden"], cfg["qc_input"])
    return prior, model


def config_changes(saved: Dict, now: Dict) -> Dict[str, List]:
    """{option: [checkpoint's value, current value]} for each current option whose value differs from the
    checkpoint's config (an option an older checkpoint lacks counts as having its default)."""
    defaults = TrainConfig().to_dict()
    out = {}
    for k in sorted(now):
        if k in NOT_COMPARED or k.startswith("debug_"):
            continue
        old = saved.get(k, defaults.get(k))
        if old != now[k]:
            out[k] = [old, now[k]]
    return out


def _arch(cfg: Dict) -> Dict:
    c = {**TrainConfig().to_dict(), **cfg}
    d = make_prior(c["prior"], c["modes"], c["sigma0"], c["latent_dim"]).d
    return {k: (d if k == "latent_dim" else c[k]) for k in ARCH_OPTIONS}


def arch_differences(saved: Dict, now: Dict) -> List[str]:
    """``--option X in the checkpoint, Y now`` for each option of ``ARCH_OPTIONS`` whose value differs."""
    a, b = _arch(saved), _arch(now)
    return [describe_change(k, a[k], b[k]) for k in ARCH_OPTIONS if a[k] != b[k]]


def describe_change(key: str, old: Any, new: Any) -> str:
    """``--key OLD in the checkpoint, NEW now``."""
    return f"{flag_name(key)} {old} in the checkpoint, {new} now"
