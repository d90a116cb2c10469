"""The paper's figures (gmwae_fast.train.figures) from a tiny untrained model, and the run comparison
(gmwae_fast.train.compare) from fake run folders. No MNIST needed."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gmwae_fast.train import compare
from gmwae_fast.train.figures import UMAP_SKIPPED, fig7c_umap, make_all_figures, umap_embedding
from gmwae_fast.train.models import GMModel
from gmwae_fast.train.priors import rot2d_prior, simplex_prior

K = 10
BASE_FIGS = {
    "fig4a_reconstructions.png",
    "fig4b_samples_per_mode.png",
    "fig4c_samples_scaled.png",
    "fig5a_interp_data.png",
    "fig5b_interp_modes.png",
    "fig7a_heatmap.png",
    "fig7b_accuracy.png",
    "fig7d_confusion.png",
    "fig2a_loss.png",
}


def _write_metrics(path, evals, train=()):
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s, "recon": 2.0 / s, "mmd": 0.1}) for s in train]
    lines += [json.dumps({"kind": "eval", **e}) for e in evals]
    path.write_text("\n".join(lines) + "\n")


def _figure_inputs(tmp_path, d):
    torch.manual_seed(0)
    model = GMModel(K=K, d=d, enc_channels=4, dec_channels=4, hidden=4)
    prior = simplex_prior(K) if d == K else rot2d_prior(K)
    n = 43  # not a multiple of anything the figures group by
    x = torch.rand(n, 1, 28, 28)
    y = torch.arange(n) % K
    heat = np.random.default_rng(0).dirichlet(np.ones(K), size=K)
    c2m = {str(c): (c + 3) % K for c in range(K)}
    conf = np.random.default_rng(1).integers(0, 30, size=(K, K))
    last_eval = {"heatmap": heat.tolist(), "test_accuracy": 0.5, "class_to_mode": c2m, "confusion": conf.tolist()}
    last_eval["hungarian_map"] = [int(k) for k in np.random.default_rng(2).permutation(K)]
    ev = [{"step": s, "test_accuracy": 0.1 * s, "active_modes": s} for s in (2, 4, 6)]
    _write_metrics(tmp_path / "metrics.jsonl", ev, train=(1, 2, 3, 4, 5, 6))
    args = SimpleNamespace(model="gmwae", prior=prior.name)
    return model, prior, x, y, last_eval, tmp_path / "metrics.jsonl", args


def _make(tmp_path, d):
    model, prior, x, y, last_eval, metrics, args = _figure_inputs(tmp_path, d)
    model.train()
    written = make_all_figures(model, prior, x, y, last_eval, metrics, tmp_path / "figures", args)
    assert model.training, "make_all_figures must leave the model in the mode it was in"
    for name in written:
        assert (tmp_path / "figures" / name).stat().st_size > 100
    return set(written)


def test_figures_without_umap_skip_fig7c_with_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` raises ImportError
    written = _make(tmp_path, d=K)
    assert written == BASE_FIGS
    out = capsys.readouterr().out
    assert out.count(UMAP_SKIPPED) == 1
    assert UMAP_SKIPPED == "Figure 7c (UMAP) skipped: pip install gmwae_fast[figures]"
    with pytest.raises(ImportError, match=r"gmwae_fast\[figures\]"):
        umap_embedding(np.zeros((30, 3)))


def test_figures_2d_latent_draw_fig3_and_no_umap(tmp_path, capsys):
    written = _make(tmp_path, d=2)
    assert written == BASE_FIGS | {"fig3_latent2d.png"}
    assert "UMAP" not in capsys.readouterr().out


def test_fig7c_rejects_bad_input(tmp_path):
    z, y = np.zeros((30, 4)), np.zeros(30)
    with pytest.raises(ValueError, match="share d"):
        fig7c_umap(z, y, np.zeros((10, 3)), tmp_path / "u.png")
    with pytest.raises(ValueError, match="labels"):
        fig7c_umap(z, y[:-1], np.zeros((10, 4)), tmp_path / "u.png")
    with pytest.raises(ValueError, match="at least"):
        fig7c_umap(z[:5], y[:5], np.zeros((10, 4)), tmp_path / "u.png")
    assert not (tmp_path / "u.png").exists()


@pytest.mark.slow  # umap-learn's first call compiles its numba kernels (~20-30 s on 2 cores); the fits are tiny
def test_umap_separates_clusters_and_fig7c_is_written(tmp_path, capsys):
    pytest.importorskip("umap")
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.1, (25, 6)), rng.normal(5, 0.1, (25, 6))
    emb = umap_embedding(np.concatenate([a, b]), seed=0, n_epochs=100)
    assert emb.shape == (50, 2) and np.isfinite(emb).all()
    ca, cb = emb[:25].mean(0), emb[25:].mean(0)
    nearer_a = np.linalg.norm(emb - ca, axis=1) < np.linalg.norm(emb - cb, axis=1)
    assert nearer_a[:25].all() and not nearer_a[25:].any()
    written = _make(tmp_path, d=K)
    assert written == BASE_FIGS | {"fig7c_umap.png"}
    assert "skipped" not in capsys.readouterr().out


# ---------------------------------------------------------------- compare (Fig. 6d / 7b over several runs)


def _run_dir(tmp_path, name, accs, model="gmvae", beta=20.0, summary=True):
    d = tmp_path / name
    d.mkdir()
    ev = [
        {"step": 50 * (i + 1), "epoch": 0.05 * (i + 1), "test_accuracy": a, "active_modes": 3 + i, "recon_l2": 9.0}
        for i, a in enumerate(accs)
    ]
    _write_metrics(d / "metrics.jsonl", ev, train=(10, 20))
    with open(d / "metrics.jsonl", "a") as fh:  # a resumed step logged twice (the last wins) and a cut-off line
        fh.write(json.dumps({"kind": "eval", "step": 50, "epoch": 0.05, "test_accuracy": 0.11, "active_modes": 2}))
        fh.write('\n{"kind": "eval", "step": 9')
    if summary:
        (d / "summary.json").write_text(json.dumps({"model": model, "config": {"beta": beta, "modes": K}}))
    return d


def test_compare_table_and_accuracy_plot(tmp_path, capsys):
    vae = _run_dir(tmp_path, "vae", [0.2, 0.4, 0.3])
    wae = _run_dir(tmp_path, "wae", [0.5, 0.9], model="gmwae", beta=1.0, summary=False)
    runs = [compare.load_run(vae), compare.load_run(wae)]
    assert [r["step"] for r in runs[0].evals] == [50, 100, 150]
    assert runs[0].evals[0]["test_accuracy"] == 0.11
    table = compare.accuracy_table(runs, ["VAE b=20", "WAE"]).splitlines()
    assert len(table) == 4
    assert table[2] == "| VAE b=20 | gmvae beta=20 | 150 | 0.3000 | 0.4000 (100) | 5/10 |"
    assert table[3] == "| WAE | ? | 100 | 0.9000 | 0.9000 (100) | 4 |"
    out = tmp_path / "sub" / "fig7b.png"
    assert compare.plot_accuracy(runs, ["a", "b"], out, x="epoch", logx=True) == out
    assert out.stat().st_size > 1000
    rc = compare.main([str(vae), str(wae), "--plot", "accuracy", "--out", str(tmp_path / "c.png")])
    assert rc == 0 and (tmp_path / "c.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| vae | gmvae beta=20 | 150 |" in printed and printed.rstrip().endswith("c.png")
    assert compare.main([str(vae), str(wae), "--out", str(tmp_path / "m.png")]) == 0  # the metrics panels
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_compare_bad_input_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        compare.load_run(empty)
    with pytest.raises(ValueError, match="no such directory"):
        compare.load_run(tmp_path / "missing")
    (empty / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no eval records"):
        compare.load_run(empty)
    run = _run_dir(tmp_path, "ok", [0.3])
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        compare.accuracy_table([compare.load_run(run)], ["a", "b"])
    with pytest.raises(SystemExit) as e:
        compare.main([str(run), str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert "nothing: not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
