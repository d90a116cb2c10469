"""The paper's figures as PNGs (torchvision grids for images, matplotlib for plots).

fig4a_reconstructions   test images (odd rows) and their reconstructions through argmax_k q_D(k|x), z = mu_k(x)
fig4b_samples_per_mode  one row per prior mode (ordered by the class each mode was mapped to)
fig4c_samples_scaled    the same with the prior std scaled by 3/5
fig5a_interp_data       latent interpolations between pairs of test images
fig5b_interp_modes      interpolations between the means of consecutive prior modes
fig7a_heatmap           E[q_D(k|x) | label]
fig7b_accuracy          held-out accuracy (and active modes) over training
fig2a_loss              training loss terms over training
fig3_latent2d           (2-D latent, e.g. rot2d) encodings and prior samples in the latent space
fig7c_umap              (d > 2, umap-learn installed) UMAP of the latent codes coloured by label, prior samples
                        in black; without umap-learn one line says "Figure 7c (UMAP) skipped: pip install
                        gmwae_fast[figures]"

Curves of several runs on one plot (Fig. 6d / 7b, GM-VAE beta sweep beside GM-WAE): gmwae_fast.train.compare.
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

UMAP_SKIPPED = "Figure 7c (UMAP) skipped: pip install gmwae_fast[figures]"
#: fewest points (codes) a UMAP figure is drawn from
MIN_UMAP_POINTS = 20


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


def _reconstructions(f: _Figs, xs, zstar) -> None:
    """fig4a: 5 x (a row of 10 test images, the row of their reconstructions)."""
    idx = torch.arange(min(50, len(xs)))
    rec = f.dec(zstar[idx])
    rows = []
    for r in range(0, len(idx), 10):
        rows += [xs[idx[r : r + 10]].cpu(), rec[r : r + 10]]
    f.save(torch.cat(rows), "fig4a_reconstructions.png", 10)


def _samples_per_mode(f: _Figs) -> None:
    """fig4b / fig4c: 10 prior samples per mode (one row per mode, in the figure's order), std scaled by 1 and 3/5."""
    for scale, name in ((1.0, "fig4b_samples_per_mode.png"), (0.6, "fig4c_samples_scaled.png")):
        zz = torch.cat([f.prior.sample_mode(k, 10, generator=f.g, scale=scale) for k in f.order])
        f.save(f.dec(zz), name, 10)


def _interpolations(f: _Figs, ys, zstar) -> None:
    """fig5a: 10 steps between up to 8 pairs of consecutive test images of different labels; fig5b: 10 steps
    between the means of consecutive (ordered) prior modes."""
    t = torch.linspace(0, 1, 10, device=f.dev)[:, None]
    pairs = [(i, i + 1) for i in range(len(ys) - 1) if int(ys[i]) != int(ys[i + 1])][:8]
    if pairs:  # none when every test image shown has the same label
        zz = torch.cat([(1 - t) * zstar[i] + t * zstar[j] for i, j in pairs])
        f.save(f.dec(zz), "fig5a_interp_data.png", 10)
    order, K, means = f.order, f.K, f.prior.means
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


def _confusion(f: _Figs, last_eval: Dict) -> None:
    """fig7d: the confusion matrix of the hard assignment (images of class c put in mode k), modes in the order of
    the Hungarian class->mode map, so that its diagonal holds the images that map counts as correct."""
    N = np.asarray(last_eval["confusion"])
    col = [int(k) for k in last_eval["hungarian_map"]]
    order = [k for k in col if k < N.shape[1]] + [k for k in range(N.shape[1]) if k not in col]
    M = N[:, order]
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(M / np.maximum(M.sum(1, keepdims=True), 1), cmap="viridis", vmin=0, vmax=1)
    for c in range(M.shape[0]):
        for j in range(M.shape[1]):
            if M[c, j]:
                ax.text(j, c, str(int(M[c, j])), ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel("mode k (Hungarian order)")
    ax.set_ylabel("digit label")
    ax.set_xticks(range(M.shape[1]))
    ax.set_xticklabels(order)
    ax.set_yticks(range(M.shape[0]))
    hits = sum(int(N[c, k]) for c, k in enumerate(col) if k < N.shape[1])
    ax.set_title(f"confusion (counts; colour: row share)  Hungarian acc={hits / max(1, int(N.sum())):.3f}")
    fig.colorbar(im, ax=ax)
    f.savefig(fig, "fig7d_confusion.png")


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


def _latent2d(f: _Figs, zs, ys) -> None:
    """fig3: prior samples and encodings in a 2-D latent space."""
    pz = f.prior.sample(len(zs), generator=f.g).cpu()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
    axes[0].scatter(pz[:, 0], pz[:, 1], s=2, c="gray")
    axes[0].set_title("prior samples")
    sc = axes[1].scatter(zs[:, 0], zs[:, 1], s=2, c=ys, cmap="tab10")
    axes[1].set_title("encodings (argmax mode), by label")
    fig.colorbar(sc, ax=axes[1])
    for ax in axes:
        ax.set_aspect("equal")
    f.savefig(fig, "fig3_latent2d.png")


def _import_umap():
    """(the umap module, None), or (None, the one-line reason Figure 7c is skipped)."""
    try:
        import umap  # type: ignore
    except ImportError:
        return None, UMAP_SKIPPED
    except Exception as e:  # installed but broken (e.g. a numba / numpy mismatch)
        return None, f"{UMAP_SKIPPED} (import umap failed: {type(e).__name__}: {e})"
    return umap, None


def umap_embedding(points: np.ndarray, *, seed: int = 0, n_neighbors: int = 15, n_epochs: int = 200) -> np.ndarray:
    """2-D UMAP embedding (umap-learn, Euclidean metric, single-threaded so that ``seed`` fixes it) of
    ``points`` (N, d), N >= ``MIN_UMAP_POINTS``; returns (N, 2) float32. n_neighbors is capped at N - 1.
    Raises ImportError when umap-learn is not importable."""
    umap, why = _import_umap()
    if umap is None:
        raise ImportError(why)
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or len(points) < MIN_UMAP_POINTS:
        raise ValueError(f"umap_embedding needs (N, d) points with N >= {MIN_UMAP_POINTS}, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("umap_embedding: the points contain NaN or inf")
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, len(points) - 1),
        n_epochs=n_epochs,
        random_state=seed,
        n_jobs=1,
    )
    return np.asarray(reducer.fit_transform(points), dtype=np.float32)


def fig7c_umap(codes, labels, prior_samples, path, *, seed: int = 0, n_epochs: int = 200) -> Path:
    """Figure 7c: one 2-D UMAP fitted jointly on the latent codes (N, d) of test images and on samples (M, d) of
    the mixture prior; the codes are coloured by their label (N,), the prior samples drawn over them in black.
    Writes a PNG to ``path`` and returns it. Raises ImportError without umap-learn (``pip install
    gmwae_fast[figures]``), ValueError on mismatched shapes or fewer than ``MIN_UMAP_POINTS`` codes.

    >>> fig7c_umap(z_test[:2000], y_test[:2000], prior.sample(500), "fig7c_umap.png")  # doctest: +SKIP
    """
    codes, prior_samples = np.asarray(codes, dtype=np.float32), np.asarray(prior_samples, dtype=np.float32)
    labels = np.asarray(labels)
    if codes.ndim != 2 or prior_samples.ndim != 2 or codes.shape[1] != prior_samples.shape[1]:
        raise ValueError(f"codes (N, d) and prior_samples (M, d) must share d: {codes.shape}, {prior_samples.shape}")
    if labels.shape != (len(codes),):
        raise ValueError(f"labels must have shape ({len(codes)},), got {labels.shape}")
    if len(codes) < MIN_UMAP_POINTS:
        raise ValueError(f"fig7c_umap needs at least {MIN_UMAP_POINTS} codes, got {len(codes)}")
    emb = umap_embedding(np.concatenate([codes, prior_samples]), seed=seed, n_epochs=n_epochs)
    e_codes, e_prior = emb[: len(codes)], emb[len(codes) :]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    top = max(int(labels.max()), 9)
    sc = ax.scatter(e_codes[:, 0], e_codes[:, 1], s=2, c=labels, cmap="tab10", vmin=-0.5, vmax=top + 0.5)
    ax.scatter(e_prior[:, 0], e_prior[:, 1], s=1, c="black", alpha=0.4, label="prior samples")
    fig.colorbar(sc, ax=ax, ticks=range(top + 1), label="label")
    ax.legend(loc="best", fontsize=7, markerscale=4)
    ax.set_title("UMAP of the latent codes (by label) and prior samples")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _umap_plot(f: _Figs, zs, ys) -> None:
    """fig7c, or one line saying why it is skipped (umap-learn missing, too few test images)."""
    umap, why = _import_umap()
    if umap is None:
        print(why)
        return
    if len(zs) < MIN_UMAP_POINTS:
        print(f"Figure 7c (UMAP) skipped: {len(zs)} test images, it needs at least {MIN_UMAP_POINTS}")
        return
    pz = f.prior.sample(max(len(zs) // 4, MIN_UMAP_POINTS), generator=f.g).cpu()
    fig7c_umap(zs.numpy(), ys.numpy(), pz.numpy(), f.fig_dir / "fig7c_umap.png", seed=0)
    f.written.append("fig7c_umap.png")


def _encode_test(f: _Figs, x_test, y_test, n_max: int = 2000):
    """The first n_max test images (on the model's device), their labels (CPU), their argmax-mode means z* (n, d)
    and one sample z of that mode (CPU): (xs, ys, zstar, zs)."""
    n = min(len(x_test), n_max)
    xs = x_test[:n].to(f.dev)
    mu, sigma, pi = encode_all(f.model, xs)
    kstar = pi.argmax(1)
    rows = torch.arange(n, device=f.dev)
    zstar = mu[rows, kstar]
    zs = (zstar + sigma[rows, kstar] * torch.randn(zstar.shape, generator=f.g, device=f.dev)).cpu()
    return xs, y_test[:n].cpu(), zstar, zs


def _log_plots(f: _Figs, metrics_path: Path, last_eval: Dict, args) -> None:
    """fig7b and fig2a from the metrics log (each only when the log has such records)."""
    train, evals = _read_metrics(metrics_path)
    if evals:
        _accuracy_curve(f, evals, last_eval, args)
    if train:
        _loss_curves(f, train)


@torch.no_grad()
def make_all_figures(model, prior, x_test, y_test, last_eval, metrics_path, fig_dir, args) -> List[str]:
    """Write the figures of the module docstring under ``fig_dir`` from the first 2000 test images and the metrics
    log; returns the file names written. fig3 only for a 2-D latent, fig7c only for d > 2 with umap-learn
    installed (without it one line says so and nothing else changes). ``args`` gives the
    titles (``args.model``, ``args.prior``). The model is left in the mode it was in."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    f = _Figs(model, prior, fig_dir, _mode_order(last_eval, model.K))
    try:
        xs, ys, zstar, zs = _encode_test(f, x_test, y_test)
        _reconstructions(f, xs, zstar)
        _samples_per_mode(f)
        _interpolations(f, ys, zstar)
        _heatmap(f, last_eval)
        if "confusion" in last_eval:  # evaluations recorded before it existed have none
            _confusion(f, last_eval)
        _log_plots(f, Path(metrics_path), last_eval, args)
        if f.prior.d == 2:
            _latent2d(f, zs, ys)
        else:
            _umap_plot(f, zs, ys)
    finally:
        model.train(was)
    return f.written
