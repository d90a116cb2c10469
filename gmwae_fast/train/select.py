"""Best of K starts by a label-free score.

    python -m gmwae_fast.train.select --candidates 3 --select-at 2000 -- \\
        --recipe robust --dec-channels 64 --steps 12000 --seed 0 --data-dir ../shared/data --out runs/sel_seed0

Deep clustering settles its partition early (docs/results.md: a merged pair of digits formed in the first
thousand steps is kept for the rest of the run), so a run's seed decides much of its accuracy. This driver runs
K candidates of one trainer configuration, seeds ``SEED + 1000 i`` (i = 0 .. K-1), each to step ``--select-at``
(the trainer's ``--stop-at``: same schedule as the full run), scores each without labels and continues the best
one to ``--steps`` in ``--out``. Scores (``--score``):

* ``mi`` (default): the mutual information ``I(x; k) = H(mean q_D) - mean H(q_D)`` of the candidate's checkpoint at
  step S, in eval mode, on 5000 training images fixed for all candidates (``metrics.mode_mutual_information``);
  higher is better: confident, evenly used modes.
* ``consistency``: the mean of the augmentation-consistency term ``KL(q_D(.|x) || q_D(.|warp(x)))`` of the train
  log over steps ``(S - W, S]``; lower is better; needs ``--consistency > 0``. (docs/results.md: it chose the worse
  candidate in two of three groups where the mutual information chose the better one.)

Outputs: ``<out>/candidates/seed<s>/`` (each candidate's run folder, paused at ``S``), ``<out>/selection.json``
(the rule, every candidate's score, evaluation at ``S`` and wall time, the choice), and the chosen run continued
in ``<out>`` itself (its checkpoints and metrics.jsonl copied there first; summary.json and figures as for any
run). Re-running the same command resumes wherever it stopped: finished candidates are not rerun, a made choice is
kept. Exit status: the trainer's (0, 2, 3, 4, 130); 2 also for options this driver refuses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import checkpoint as ck
from .cli import _parse
from .cli import main as train_main
from .config import TrainConfig, prior_and_model
from .data import load_mnist, subset
from .ema import delivered_weights
from .metrics import encode_all, mode_mutual_information

SEED_STRIDE = 1000
RULES = {
    "mi": "highest mutual information I(x; k) of q_D at the checkpoint of step {s} (eval mode, 5000 fixed training "
    "images); labels unused",
    "consistency": "lowest mean consistency term over train-log steps ({lo}, {s}]; labels unused",
}
SELECTION = "selection.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gmwae_fast.train.select",
        description=(__doc__ or "").split("\n\n")[0],
        usage="%(prog)s [--candidates K] --select-at S [--score mi|consistency] [--score-window W] -- TRAINER_OPTIONS",
    )
    p.add_argument("--candidates", type=int, default=3, help="number of starts K (>= 1)")
    p.add_argument("--select-at", type=int, required=True, help="step S at which the candidates are compared")
    p.add_argument("--score", choices=sorted(RULES), default="mi", help="the label-free score (module docstring)")
    p.add_argument(
        "--score-window", type=int, default=500, help="W: --score consistency averages the train log over (S - W, S]"
    )
    return p


def candidate_seeds(seed: int, k: int) -> List[int]:
    """The candidates' seeds: ``seed + 1000 i``, i = 0 .. k-1 (candidate 0 is the plain run of ``seed``)."""
    return [seed + SEED_STRIDE * i for i in range(k)]


def consistency_score(metrics: Path, select_at: int, window: int) -> float:
    """Mean ``consistency`` of the train-log entries of ``metrics`` (a metrics.jsonl) with step in
    ``(select_at - window, select_at]``; ValueError when there are none."""
    vals = []
    with open(metrics) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train" and select_at - window < r["step"] <= select_at and "consistency" in r:
                vals.append(float(r["consistency"]))
    if not vals:
        raise ValueError(
            f"{metrics}: no train-log entries with a consistency term in steps ({select_at - window}, {select_at}]"
        )
    return sum(vals) / len(vals)


SCORE_IMAGES = 5000


def score_images(cfg: TrainConfig) -> torch.Tensor:
    """The unlabelled images every candidate is scored on: a fixed draw of 5000 training images (the same for
    every candidate, whatever its seed or --train-subset)."""
    x, y, _, _ = load_mnist(cfg.data_dir, download=not cfg.no_download)
    return subset(x, y, SCORE_IMAGES, 0)[0]


def mi_score(st: Dict, x: torch.Tensor) -> float:
    """:func:`.metrics.mode_mutual_information` of q_D of the model the loaded checkpoint ``st`` delivers (the
    weight average with --ema) on ``x``, eval mode."""
    _, model = prior_and_model(st["config"])
    model.load_state_dict(delivered_weights(st))
    model.eval()
    return mode_mutual_information(encode_all(model, x)[2])


def _eval_at(metrics: Path, step: int) -> Optional[Dict]:
    """The evaluation record of ``metrics`` at ``step`` (for the record only: the choice never reads it)."""
    with open(metrics) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "eval" and r["step"] == step:
                return r
    return None


def _ckpt_step(run: Path) -> int:
    path = run / "checkpoints" / ck.CKPT_NAME
    return int(ck.load_checkpoint(path)["step"]) if path.is_file() else 0


def _run_candidate(argv: List[str], seed: int, run: Path, select_at: int) -> int:
    """Trains one candidate to ``select_at`` (resuming it if it has a checkpoint); the trainer's exit status."""
    step = _ckpt_step(run)
    if step >= select_at:
        return 0
    extra = ["--seed", str(seed), "--out", str(run), "--stop-at", str(select_at), "--no-figures"]
    return train_main(argv + extra + (["--resume"] if step else []))


class CandidateFailed(Exception):
    """A candidate's training ended with a non-zero exit status (``rc``)."""

    def __init__(self, seed: int, rc: int):
        super().__init__(f"candidate seed {seed} ended with exit status {rc}")
        self.rc = rc


def _choose(cfg: TrainConfig, args: argparse.Namespace, argv: List[str]) -> Dict:
    """Runs the candidates, puts the best one's checkpoint and metrics in ``cfg.out_dir`` and writes
    selection.json (last); CandidateFailed when a candidate's training fails."""
    rows = []
    for s in candidate_seeds(cfg.seed, args.candidates):
        run = cfg.out_dir / "candidates" / f"seed{s}"
        rc = _run_candidate(argv, s, run, args.select_at)
        if rc != 0:
            raise CandidateFailed(s, rc)
    x = score_images(cfg)
    for s in candidate_seeds(cfg.seed, args.candidates):
        run = cfg.out_dir / "candidates" / f"seed{s}"
        ev = _eval_at(run / "metrics.jsonl", args.select_at) or {}
        st = ck.load_checkpoint(run / "checkpoints" / ck.CKPT_NAME)
        scores = {"mi": mi_score(st, x)}
        if cfg.consistency:
            scores["consistency"] = consistency_score(run / "metrics.jsonl", args.select_at, args.score_window)
        rows.append(
            dict(
                seed=s,
                run=str(run),
                checkpoint_step=st["step"],
                score=scores[args.score],
                scores=scores,
                eval_at_select={k: ev.get(k) for k in ("test_accuracy", "active_modes", "usage_kl", "recon_l2")},
                wall_s=st.get("wall_s"),
            )
        )
    best = (max if args.score == "mi" else min)(rows, key=lambda r: r["score"])
    sel = dict(
        rule=RULES[args.score].format(s=args.select_at, lo=args.select_at - args.score_window),
        score=args.score,
        select_at=args.select_at,
        score_window=args.score_window,
        candidates=rows,
        chosen_seed=best["seed"],
    )
    _copy_run(Path(best["run"]), cfg.out_dir)
    tmp = cfg.out_dir / (SELECTION + ".tmp")
    tmp.write_text(json.dumps(sel, indent=1) + "\n")
    tmp.replace(cfg.out_dir / SELECTION)  # written last: its presence means the chosen run is in place
    return sel


def _copy_run(src: Path, dst: Path) -> None:
    """The chosen candidate's checkpoint and metrics, copied to the run folder ``dst`` it continues in."""
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "checkpoints" / ck.CKPT_NAME, dst / "checkpoints" / ck.CKPT_NAME)
    shutil.copy2(src / "metrics.jsonl", dst / "metrics.jsonl")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m gmwae_fast.train.select``; the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:cut])  # --help exits here
    if cut == len(argv):
        parser.error("separate the trainer's options with --")
    targv = argv[cut + 1 :]
    for banned in ("--resume", "--stop-at", "--init-from"):
        if banned in targv:
            parser.error(f"{banned} is not a trainer option for select (it resumes by itself)")
    if args.candidates < 1 or args.score_window < 1:
        parser.error("--candidates and --score-window must be at least 1")
    cfg = _parse(targv)
    if args.score == "consistency" and not cfg.consistency:
        parser.error("--score consistency needs the trainer's --consistency > 0 (or --recipe robust)")
    if not 0 < args.select_at < cfg.steps:
        parser.error(f"--select-at ({args.select_at}) must lie in (0, --steps = {cfg.steps})")
    if cfg.out is None:
        parser.error("give the trainer --out (the chosen run continues there)")
    if args.score == "consistency" and cfg.log_every > args.score_window:
        parser.error(f"--log-every ({cfg.log_every}) must not exceed --score-window ({args.score_window})")
    if not (cfg.out_dir / SELECTION).is_file():
        try:
            _choose(cfg, args, targv)
        except CandidateFailed as e:
            print(f"select: {e}; re-run the same command to continue", file=sys.stderr)
            return e.rc
        except ValueError as e:  # a candidate folder without train-log entries in the window
            print(f"error: select: {e}", file=sys.stderr)
            return 2
    sel = json.loads((cfg.out_dir / SELECTION).read_text())
    print(
        f"select ({sel['score']}): "
        + ", ".join(f"seed {r['seed']} {r['score']:.4f}" for r in sel["candidates"])
        + f" -> continuing seed {sel['chosen_seed']} in {cfg.out_dir}",
        file=sys.stderr,
    )
    if _ckpt_step(cfg.out_dir) >= cfg.steps and (cfg.out_dir / "summary.json").is_file():
        print(f"select: {cfg.out_dir} has already finished its {cfg.steps} steps", file=sys.stderr)
        return 0
    return train_main(targv + ["--seed", str(sel["chosen_seed"]), "--resume"])


if __name__ == "__main__":
    sys.exit(main())
