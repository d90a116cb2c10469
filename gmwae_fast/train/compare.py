"""Overlay the evaluation curves of several runs and tabulate them (the paper's Fig. 6d / 7b: the GM-VAE's held-out
accuracy for beta in {1, 5, 10, 20} beside the GM-WAE's).

python -m gmwae_fast.train.compare RUN [RUN ...] --out FILE.png [--labels L ...] [--plot accuracy] [--x epoch] [--logx]

Each RUN is a training output folder: ``metrics.jsonl`` (its ``{"kind": "eval", "step", "test_accuracy", ...}``
lines are read) and, when present, ``summary.json`` (model, beta and the number of modes, for the table).
``--plot metrics`` (default) draws one panel per evaluation metric (held-out accuracy, active modes, Bernoulli NLL,
L2 reconstruction); ``--plot accuracy`` draws Fig. 7b / 6d: held-out accuracy over training, active modes beside.
Both print a markdown table of the final and best held-out accuracy and the final active modes, then the PNG's path.

Example (recorded runs)::

    python -m gmwae_fast.train.compare experiments/gmwae_simplex_seed0_cons50 \\
        experiments/gmvae_beta20_scratch_seed0 experiments/gmvae_beta20_initwae_seed0 \\
        --labels "GM-WAE" "GM-VAE b=20" "GM-VAE b=20 (init GM-WAE)" --plot accuracy --x epoch --logx --out fig7b.png
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC_KEYS = ("test_accuracy", "active_modes", "bernoulli_nll", "recon_l2")


@dataclass(frozen=True)
class RunCurves:
    """The evaluation records of one run, one per step in step order (the last record wins for a step logged twice,
    e.g. after --resume), and its summary.json (None when the run has none yet)."""

    path: Path
    evals: List[Dict]
    summary: Optional[Dict]

    def series(self, key: str, x: str = "step"):
        """(xs, ys) of the records that have ``key``; x is ``"step"`` or ``"epoch"``."""
        rows = [r for r in self.evals if r.get(key) is not None]
        if any(x not in r for r in rows):
            raise ValueError(f"{self.path}: an eval record has no {x!r} field")
        return [r[x] for r in rows], [r[key] for r in rows]


def load_run(run_dir) -> RunCurves:
    """Read a run folder; ValueError naming the folder when it, its metrics.jsonl or its eval records (with a
    test_accuracy) are missing, or when summary.json is not JSON. Unparseable lines of metrics.jsonl (a line cut
    short by a run still writing) are ignored."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path}: not a run folder (no such directory)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{path}: no metrics.jsonl (is this a training output folder?)")
    by_step: Dict[int, Dict] = {}
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.get("kind") == "eval" and "step" in r and "test_accuracy" in r:
            by_step[int(r["step"])] = r
    if not by_step:
        raise ValueError(f"{metrics}: no eval records with a test_accuracy")
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / 'summary.json'}: not JSON ({e})") from None
    return RunCurves(path, [by_step[s] for s in sorted(by_step)], summary)


def _check_labels(runs: Sequence[RunCurves], labels: Optional[Sequence[str]]) -> List[str]:
    if labels is None:
        return [r.path.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs: name every run")
    return list(labels)


def _model_name(s: Optional[Dict]) -> str:
    if not s:
        return "?"
    beta = (s.get("config") or {}).get("beta")
    return f"{s.get('model', '?')} beta={beta:g}" if s.get("model") == "gmvae" and beta is not None else s["model"]


def accuracy_table(runs: Sequence[RunCurves], labels: Optional[Sequence[str]] = None) -> str:
    """Markdown table, one row per run: model (beta for a GM-VAE), last evaluated step, final and best held-out
    accuracy (with its step) and the final active modes (out of K when summary.json gives it)."""
    labels = _check_labels(runs, labels)
    out = [
        "| run | model | steps | final accuracy | best accuracy (step) | active modes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run, lab in zip(runs, labels):
        last = run.evals[-1]
        best = max(run.evals, key=lambda r: r["test_accuracy"])
        K = ((run.summary or {}).get("config") or {}).get("modes")
        act = last.get("active_modes", "?")
        out.append(
            f"| {lab} | {_model_name(run.summary)} | {last['step']} | {last['test_accuracy']:.4f} "
            f"| {best['test_accuracy']:.4f} ({best['step']}) | {act}{f'/{K}' if K else ''} |"
        )
    return "\n".join(out)


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _style(ax, x: str, logx: bool, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(x)
    if logx:
        ax.set_xscale("log")


def plot_accuracy(runs, labels=None, out="fig7b_accuracy_runs.png", x: str = "step", logx: bool = False) -> Path:
    """Fig. 7b / 6d: the held-out accuracy of every run over training (left) and its active modes (right), against
    ``x`` (``"step"`` or ``"epoch"``; log scale with ``logx``). Writes the PNG ``out`` and returns its path."""
    labels = _check_labels(runs, labels)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for run, lab in zip(runs, labels):
        ax.plot(*run.series("test_accuracy", x), "o-", ms=3, label=lab)
        ax2.plot(*run.series("active_modes", x), "s-", ms=3, label=lab)
    _style(ax, x, logx, "held-out accuracy")
    _style(ax2, x, logx, "active modes")
    ax.set_ylim(0, 1)
    ax2.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out)


def plot_metrics(runs, labels=None, out="compare.png", x: str = "step", logx: bool = False) -> Path:
    """One panel per metric of ``METRIC_KEYS`` with every run's curve (records without the metric are left out).
    Writes the PNG ``out`` and returns its path."""
    labels = _check_labels(runs, labels)
    fig, axes = plt.subplots(1, len(METRIC_KEYS), figsize=(3.6 * len(METRIC_KEYS), 3.2))
    for run, lab in zip(runs, labels):
        for ax, k in zip(axes, METRIC_KEYS):
            ax.plot(*run.series(k, x), "o-", ms=3, label=lab)
    for ax, k in zip(axes, METRIC_KEYS):
        _style(ax, x, logx, k)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    return _save(fig, out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmwae_fast.train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl)")
    p.add_argument("--labels", nargs="*", default=None, help="one per run (default: the folder names)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--plot", choices=("metrics", "accuracy"), default="metrics")
    p.add_argument("--x", choices=("step", "epoch"), default="step", help="the x axis")
    p.add_argument("--logx", action="store_true", help="log-scale x axis")
    return p


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    draw = plot_accuracy if a.plot == "accuracy" else plot_metrics
    try:
        runs = [load_run(r) for r in a.runs]
        table = accuracy_table(runs, a.labels)
        out = draw(runs, a.labels, a.out, x=a.x, logx=a.logx)
    except ValueError as e:
        p.error(str(e))
    print(table)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
