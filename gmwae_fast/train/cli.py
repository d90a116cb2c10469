"""Command line trainer.

    python -m gmwae_fast.train --model gmwae --prior simplex --data-dir ../shared/data --steps 600 --out runs/x

The options are the fields of :class:`.config.TrainConfig` (``build_parser`` derives them from the fields'
metadata); the run is a :class:`.trainer.Trainer`. Outputs under --out: metrics.jsonl, summary.json,
checkpoints/last.pt and figures/*.png (see :mod:`.trainer`). Data-parallel: ``torchrun --nproc_per_node=R -m
gmwae_fast.train ...`` (see :mod:`.dist`); rank 0 writes every output. Exit status: 0, 2 (invalid options, or one
``error:`` line for unusable data / checkpoint / output directory / backend), 3 (diverged), 4 (data-parallel: a
collective failed or timed out because another rank failed, was killed or is stuck), 130 (interrupted).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Set

import torch

from . import checkpoint as ck
from . import dist as dp
from .config import TrainConfig, cli_options, flag_name, recipes_help
from .data import InvalidDataError, MissingDataError
from .lock import OutputBusyError, output_lock
from .trainer import RunError, Trainer, TrainingDiverged

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The parser of every :class:`TrainConfig` field, ``--field-name``, as its ``metadata["cli"]`` describes it."""
    p = argparse.ArgumentParser(
        prog="python -m gmwae_fast.train",
        description="Train a GM-WAE (or the GM-VAE baseline) on MNIST.",
        epilog=recipes_help(),
        formatter_class=_HelpFormatter,
    )
    groups = {"": p}
    for name, default, opt in cli_options():
        if opt.group not in groups:
            groups[opt.group] = p.add_argument_group(opt.group)
        kw = {"default": default, "help": argparse.SUPPRESS if opt.hidden else opt.help}
        if opt.flag:
            kw["action"] = "store_true"
        kw.update({k: v for k, v in (("type", opt.parse), ("choices", opt.choices), ("metavar", opt.metavar)) if v})
        groups[opt.group].add_argument(flag_name(name), **kw)
    return p


def explicit_options(argv: List[str]) -> Set[str]:
    """The option names (dests) given explicitly in ``argv``."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def main(argv: Optional[list] = None) -> int:
    """``python -m gmwae_fast.train``. Returns 0, 2 (a clear ``error:`` line: unusable data, checkpoint, output
    directory, backend or resume options), EXIT_DIVERGED (3), dist.EXIT_PEER_FAILED (4: data-parallel, a collective
    failed or timed out) or EXIT_INTERRUPTED (130); invalid options exit 2 through argparse. Under torchrun
    (WORLD_SIZE > 1) it joins the process group first and leaves it before returning."""
    cfg = _parse(list(sys.argv[1:] if argv is None else argv))
    kind = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    env, failed = None, True
    try:
        env = _init_env(kind, cfg.dist_timeout)
        rc = _train(cfg, env, kind)
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
            f"another rank probably failed, was killed or is stuck (--dist-timeout {cfg.dist_timeout:g} s). "
            f"Rank 0 keeps the last complete checkpoint; continue with --resume",
            file=sys.stderr,
        )
        return dp.EXIT_PEER_FAILED
    finally:
        dp.shutdown(env, failed)


def _parse(argv: List[str]) -> TrainConfig:
    """The config of ``argv`` (recipe applied); an argparse error (exit 2) for invalid values, a CUDA device that
    is not there, a missing --init-from or --resume checkpoint, or a bad torchrun environment."""
    parser = build_parser()
    cfg = TrainConfig.from_args(parser.parse_args(argv), explicit_options(argv))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    try:
        cfg.validate(dp.env_world_size(), os.environ.get("RANK", "?"))
    except ValueError as e:  # ConfigError, or WORLD_SIZE / RANK that are not numbers
        parser.error(str(e))
    if cfg.init_from and not Path(cfg.init_from).is_file():
        parser.error(f"--init-from: no such checkpoint {cfg.init_from!r}")
    ckpt = cfg.out_dir / "checkpoints" / ck.CKPT_NAME
    if cfg.resume and os.environ.get("RANK", "0") == "0" and not ckpt.is_file():
        parser.error(f"--resume: no checkpoint at {ckpt}")
    return cfg


def _train(cfg: TrainConfig, env: Optional[dp.DistEnv], kind: str) -> int:
    """Runs the trainer; its exit status."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(f"cuda:{env.local_rank}" if env is not None and kind == "cuda" else kind)
    if env is None or env.rank == 0:  # the rank that writes the folder holds its lock
        try:
            with output_lock(cfg.out_dir):
                return _run(cfg, device, env)
        except OutputBusyError as e:
            raise RunError(str(e)) from None
    return _run(cfg, device, env)


def _run(cfg: TrainConfig, device: torch.device, env: Optional[dp.DistEnv]) -> int:
    trainer = Trainer(cfg, device, cfg.out_dir, env)
    try:
        trainer.setup()
        interrupted = trainer.train()
    except TrainingDiverged as e:
        trainer.report_divergence(e)
        return EXIT_DIVERGED
    if interrupted:
        return EXIT_INTERRUPTED
    if trainer.is_main and not trainer.paused:
        trainer.finish()
    return 0


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
