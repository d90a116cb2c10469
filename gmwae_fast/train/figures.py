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

import numpy as np
import torch

import matplotlib

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


@torch.no_grad()
def make_all_figures(model, prior, x_test, y_test, last_eval, metrics_path, fig_dir, ops, args) -> List[str]:
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    written = []
    dev = next(model.parameters()).device
    K = model.K
    g = torch.Generator(device=dev).manual_seed(0)
    order = _mode_order(last_eval, K)

    def dec(z):
        return torch.sigmoid(model.decode(z.to(dev))).cpu()

    def save(t, name, nrow):
        save_image(t, fig_dir / name, nrow=nrow, padding=2, pad_value=1.0)
        written.append(name)

    try:
        n = min(len(x_test), 2000)
        xs = x_test[:n].to(dev)
        mu, sigma, pi = encode_all(model, xs)
        kstar = pi.argmax(1)
        zstar = mu[torch.arange(n, device=dev), kstar]                          # (n, d)
        ys = y_test[:n].cpu()

        # 4a: 5 x (originals row, reconstructions row), 10 per row
        idx = torch.arange(min(50, n))
        rec = dec(zstar[idx])
        rows = []
        for r in range(0, len(idx), 10):
            rows += [xs[idx[r:r + 10]].cpu(), rec[r:r + 10]]
        save(torch.cat(rows), "fig4a_reconstructions.png", 10)

        # 4b / 4c: samples per mode
        for scale, name in ((1.0, "fig4b_samples_per_mode.png"), (0.6, "fig4c_samples_scaled.png")):
            zz = torch.cat([prior.sample_mode(k, 10, generator=g, scale=scale) for k in order])
            save(dec(zz), name, 10)

        # 5a: interpolation between pairs of test images (different labels), 10 steps
        t = torch.linspace(0, 1, 10, device=dev)[:, None]
        pairs, used = [], 0
        for i in range(n - 1):
            if int(ys[i]) != int(ys[i + 1]):
                pairs.append((i, i + 1))
            if len(pairs) == 8:
                break
        zz = torch.cat([(1 - t) * zstar[i] + t * zstar[j] for i, j in pairs])
        save(dec(zz), "fig5a_interp_data.png", 10)

        # 5b: between the means of consecutive (ordered) prior modes
        zz = torch.cat([(1 - t) * prior.means[order[r]] + t * prior.means[order[(r + 1) % K]] for r in range(K)])
        save(dec(zz), "fig5b_interp_modes.png", 10)

        # 7a: heatmap
        M = np.asarray(last_eval["heatmap"])[:, order]
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        im = ax.imshow(M, cmap="viridis", vmin=0, vmax=1)
        ax.set_xlabel("mode k (ordered by the class mapped to it)")
        ax.set_ylabel("digit label")
        ax.set_xticks(range(K))
        ax.set_xticklabels(order)
        ax.set_yticks(range(M.shape[0]))
        ax.set_title(f"E[q_D(k|x) | label]  acc={last_eval['test_accuracy']:.3f}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(fig_dir / "fig7a_heatmap.png", dpi=80)
        plt.close(fig)
        written.append("fig7a_heatmap.png")

        train, evals = _read_metrics(Path(metrics_path))
        if evals:
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
            ax2.set_ylim(0, K + 0.5)
            ax.legend(loc="lower right", fontsize=8)
            ax.set_title(f"{args.model} ({args.prior})")
            fig.tight_layout()
            fig.savefig(fig_dir / "fig7b_accuracy.png", dpi=80)
            plt.close(fig)
            written.append("fig7b_accuracy.png")
        if train:
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
            fig.tight_layout()
            fig.savefig(fig_dir / "fig2a_loss.png", dpi=80)
            plt.close(fig)
            written.append("fig2a_loss.png")

        # latents for 3a/3b and 7c: one sample from the argmax mode of each test image
        zs = (zstar + sigma[torch.arange(n, device=dev), kstar] * torch.randn(zstar.shape, generator=g, device=dev)).cpu()
        if prior.d == 2:
            pz = prior.sample(n, generator=g).cpu()
            fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
            axes[0].scatter(pz[:, 0], pz[:, 1], s=2, c="gray")
            axes[0].set_title("prior samples")
            sc = axes[1].scatter(zs[:, 0], zs[:, 1], s=2, c=ys, cmap="tab10")
            axes[1].set_title("encodings (argmax mode), by label")
            fig.colorbar(sc, ax=axes[1])
            for ax in axes:
                ax.set_aspect("equal")
            fig.tight_layout()
            fig.savefig(fig_dir / "fig3_latent2d.png", dpi=80)
            plt.close(fig)
            written.append("fig3_latent2d.png")
        try:
            import umap  # type: ignore
        except Exception:
            umap = None
        if umap is not None and prior.d > 2:
            emb = umap.UMAP(n_neighbors=15, random_state=0).fit_transform(zs.numpy())
            fig, ax = plt.subplots(figsize=(5, 4.5))
            sc = ax.scatter(emb[:, 0], emb[:, 1], s=2, c=ys, cmap="tab10")
            fig.colorbar(sc, ax=ax)
            ax.set_title("UMAP of the latents, by label")
            fig.tight_layout()
            fig.savefig(fig_dir / "fig7c_umap.png", dpi=80)
            plt.close(fig)
            written.append("fig7c_umap.png")
    finally:
        model.train(was)
    return written
