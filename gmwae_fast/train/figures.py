"""The paper's figures as PNGs (torchvision grids for images, matplotlib for plots).

fig4a_reconstructions   test images (odd rows) and their reconstructions through argmax_k q_D(k|x), z = mu_k(x)
fig4b_samples_per_mode  one row per prior mode (ordered by the class each mode was mapped to)
fig4c_samples_scaled    the same with the prior std scaled by 3/5
fig5a_interp_data       latent interpolations between pairs of test images
fig5b_interp_modes      interpolations between the means of consecutive prior modes
fig7a_heatmap           E[q_D(k|x) | label]
fig7b_accuracy          held-out accuracy (and active modes) over training
fig2a_loss              training loss terms over training
fig3_latent2d           (rot2d) encodings and prior samples in the 2-D latent space
fig7c_umap              (umap-learn installed) UMAP of the latents coloured by label
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from .metrics import encode_all  # noqa: E402


def _mode_order(last_eval: Dict, K: int) -> List[int]:
    c2m = {int(c): int(k) for c, k in (last_eval.get("class_to_mode") or {}).items()}
    order = [c2m[c] for c in sorted(c2m)]
    return order + [k for k in range(K) if k not in order]


def _read_metrics(path: Path):
    train, evals = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            (train if r.get("kind") == "train" else evals if r.get("kind") == "eval" else []).append(r)
    return train, evals


class _Figs:
    """Where and how the figures of one call are drawn: the model's device, the mode order, the generator, and the
    names written so far."""

    def __init__(self, model, prior, fig_dir: Path, order: List[int]):
        self.model, self.prior, self.fig_dir, self.order = model, prior, fig_dir, order
        self.dev = next(model.parameters()).device
        self.K = model.K
        self.g = torch.Generator(device=self.dev).manual_seed(0)
        self.written: List[str] = []

    def dec(self, z):
        return torch.sigmoid(self.model.decode(z.to(self.dev))).cpu()

    def save(self, t, name: str, nrow: int) -> None:
        save_image(t, self.fig_dir / name, nrow=nrow, padding=2, pad_value=1.0)
        self.written.append(name)

    def savefig(self, fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(self.fig_dir / name, dpi=80)
        plt.close(fig)
        self.written.append(name)


def _image_grids(f: _Figs, xs, ys, zstar) -> None:
    """fig4a (originals and reconstructions), fig4b / fig4c (samples per mode), fig5a / fig5b (interpolations)."""
    n = len(xs)
    idx = torch.arange(min(50, n))
    rec = f.dec(zstar[idx])
    rows = []
    for r in range(0, len(idx), 10):  # 5 x (originals row, reconstructions row), 10 per row
        rows += [xs[idx[r : r + 10]].cpu(), rec[r : r + 10]]
    f.save(torch.cat(rows), "fig4a_reconstructions.png", 10)
    for scale, name in ((1.0, "fig4b_samples_per_mode.png"), (0.6, "fig4c_samples_scaled.png")):
        zz = torch.cat([f.prior.sample_mode(k, 10, generator=f.g, scale=scale) for k in f.order])
        f.save(f.dec(zz), name, 10)
    t = torch.linspace(0, 1, 10, device=f.dev)[:, None]
    pairs = []  # pairs of consecutive test images of different labels, 10 steps each
    for i in range(n - 1):
        if int(ys[i]) != int(ys[i + 1]):
            pairs.append((i, i + 1))
        if len(pairs) == 8:
            break
    zz = torch.cat([(1 - t) * zstar[i] + t * zstar[j] for i, j in pairs])
    f.save(f.dec(zz), "fig5a_interp_data.png", 10)
    order, K, means = f.order, f.K, f.prior.means  # between the means of consecutive (ordered) prior modes
    zz = torch.cat([(1 - t) * means[order[r]] + t * means[order[(r + 1) % K]] for r in range(K)])
    f.save(f.dec(zz), "fig5b_interp_modes.png", 10)


def _heatmap(f: _Figs, last_eval: Dict) -> None:
    """fig7a: E[q_D(k|x) | label], modes in the figure's order."""
    M = np.asarray(last_eval["heatmap"])[:, f.order]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(M, cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("mode k (ordered by the class mapped to it)")
    ax.set_ylabel("digit label")
    ax.set_xticks(range(f.K))
    ax.set_xticklabels(f.order)
    ax.set_yticks(range(M.shape[0]))
    ax.set_title(f"E[q_D(k|x) | label]  acc={last_eval['test_accuracy']:.3f}")
    fig.colorbar(im, ax=ax)
    f.savefig(fig, "fig7a_heatmap.png")


def _accuracy_curve(f: _Figs, evals: List[Dict], last_eval: Dict, args) -> None:
    """fig7b: held-out accuracy (and the k-means baseline) and active modes over training."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    s = [r["step"] for r in evals]
    ax.plot(s, [r["test_accuracy"] for r in evals], "o-", label="test accuracy")
    if "kmeans_accuracy" in last_eval:
        ax.axhline(last_eval["kmeans_accuracy"], color="gray", ls="--", label="k-means (pixels)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(s, [r["active_modes"] for r in evals], "s:", color="C1", label="active modes")
    ax2.set_ylabel("active modes")
    ax2.set_ylim(0, f.K + 0.5)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{args.model} ({args.prior})")
    f.savefig(fig, "fig7b_accuracy.png")


def _loss_curves(f: _Figs, train: List[Dict]) -> None:
    """fig2a: each logged loss term over training (log scale when positive)."""
    keys = [k for k in ("loss", "recon", "mmd", "kl_c", "kl_d") if k in train[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    axes = np.atleast_1d(axes)
    s = [r["step"] for r in train]
    for ax, k in zip(axes, keys):
        v = np.array([r[k] for r in train])
        ax.plot(s, v)
        if (v > 0).all():
            ax.set_yscale("log")
        ax.set_title(k)
        ax.set_xlabel("step")
    f.savefig(fig, "fig2a_loss.png")


def _latent_plots(f: _Figs, zs, ys) -> None:
    """fig3 (2-D latent: prior samples and encodings) and fig7c (UMAP of the latents, umap-learn installed)."""
    n = len(zs)
    if f.prior.d == 2:
        pz = f.prior.sample(n, generator=f.g).cpu()
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
        axes[0].scatter(pz[:, 0], pz[:, 1], s=2, c="gray")
        axes[0].set_title("prior samples")
        sc = axes[1].scatter(zs[:, 0], zs[:, 1], s=2, c=ys, cmap="tab10")
        axes[1].set_title("encodings (argmax mode), by label")
        fig.colorbar(sc, ax=axes[1])
        for ax in axes:
            ax.set_aspect("equal")
        f.savefig(fig, "fig3_latent2d.png")
    try:
        import umap  # type: ignore
    except Exception:
        umap = None
    if umap is not None and f.prior.d > 2:
        emb = umap.UMAP(n_neighbors=15, random_state=0).fit_transform(zs.numpy())
        fig, ax = plt.subplots(figsize=(5, 4.5))
        sc = ax.scatter(emb[:, 0], emb[:, 1], s=2, c=ys, cmap="tab10")
        fig.colorbar(sc, ax=ax)
        ax.set_title("UMAP of the latents, by label")
        f.savefig(fig, "fig7c_umap.png")


@torch.no_grad()
def make_all_figures(model, prior, x_test, y_test, last_eval, metrics_path, fig_dir, ops, args) -> List[str]:
    """Write the figures of the module docstring under ``fig_dir`` (from the first 2000 test images and the
    metrics log); returns the file names written. The model is left in the mode it was in."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    f = _Figs(model, prior, fig_dir, _mode_order(last_eval, model.K))
    try:
        n = min(len(x_test), 2000)
        xs = x_test[:n].to(f.dev)
        mu, sigma, pi = encode_all(model, xs)
        kstar = pi.argmax(1)
        rows = torch.arange(n, device=f.dev)
        zstar = mu[rows, kstar]  # (n, d)
        ys = y_test[:n].cpu()
        _image_grids(f, xs, ys, zstar)
        _heatmap(f, last_eval)
        train, evals = _read_metrics(Path(metrics_path))
        if evals:
            _accuracy_curve(f, evals, last_eval, args)
        if train:
            _loss_curves(f, train)
        # latents for fig3 / fig7c: one sample from the argmax mode of each test image
        zs = (zstar + sigma[rows, kstar] * torch.randn(zstar.shape, generator=f.g, device=f.dev)).cpu()
        _latent_plots(f, zs, ys)
    finally:
        model.train(was)
    return f.written
