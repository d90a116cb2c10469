"""Overlay the evaluation curves of several runs (e.g. GM-WAE vs GM-VAE, the paper's Fig. 6d / 7b).

python -m gmwae_fast.train.compare runs/gmwae runs/gmvae --out experiments/compare.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmwae_fast.train.compare")
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    labels = a.labels or [Path(r).name for r in a.runs]
    if len(labels) != len(a.runs):
        p.error("--labels must name every run")
    keys = ("test_accuracy", "active_modes", "bernoulli_nll", "recon_l2")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2))
    for run, lab in zip(a.runs, labels):
        path = Path(run) / "metrics.jsonl"
        if not path.exists():
            p.error(f"no metrics.jsonl in {run}")
        ev = [json.loads(l) for l in path.read_text().splitlines() if '"kind": "eval"' in l]
        for ax, k in zip(axes, keys):
            ax.plot([r["step"] for r in ev], [r[k] for r in ev], "o-", ms=3, label=lab)
    for ax, k in zip(axes, keys):
        ax.set_title(k)
        ax.set_xlabel("step")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=80)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
