"""Tests of the GM-WAE / GM-VAE trainer (gmwae_fast.train). CPU only, tiny models, a few seconds each."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gmwae_fast.train import checkpoint as ck
from gmwae_fast.train.cli import EXIT_DIVERGED, EXIT_INTERRUPTED, build_parser, main
from gmwae_fast.train.data import MNIST_FILES, MissingDataError, load_mnist
from gmwae_fast.train.losses import gaussian_kl_to_prior
from gmwae_fast.train.metrics import active_modes, greedy_class_to_mode, protocol_accuracy
from gmwae_fast.train.priors import make_prior, rot2d_prior, simplex_prior

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GMWAE_DATA", REPO.parent / "shared" / "data"))
HAVE_DATA = all(
    (DATA / "MNIST" / "raw" / f).exists() or (DATA / "MNIST" / "raw" / (f + ".gz")).exists() for f in MNIST_FILES
)
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"MNIST not under {DATA} (set GMWAE_DATA)")


# ------------------------------------------------------------------------------------------------ priors
@pytest.mark.parametrize("sigma0", [1.0, 0.5])
def test_simplex_prior_equidistant_4_sigma(sigma0):
    p = simplex_prior(10, sigma0=sigma0)
    assert p.means.shape == (10, 10) and p.d == 10
    D = torch.cdist(p.means.double(), p.means.double())
    off = D[~torch.eye(10, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 4 * sigma0), atol=1e-5)
    assert torch.allclose(p.diag_stds, torch.full((10, 10), sigma0))
    assert torch.allclose(p.covs, sigma0**2 * torch.eye(10).expand(10, 10, 10))
    # samples: the right per-mode spread
    z = p.sample_mode(3, 20000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(0), p.means[3], atol=0.05 * sigma0 + 0.02)
    assert torch.allclose(z.std(0), torch.full((10,), sigma0), rtol=0.05)


def test_simplex_prior_lower_dim():
    p = make_prior("simplex", 10, 1.0, latent_dim=9)
    D = torch.cdist(p.means.double(), p.means.double())
    off = D[~torch.eye(10, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 4.0), atol=1e-4)
    with pytest.raises(ValueError):
        make_prior("simplex", 10, 1.0, latent_dim=5)


@pytest.mark.parametrize("K,d", [(9, 10), (7, 12)])
def test_simplex_prior_higher_dim(K, d):
    """d > K: the K-1 dimensional simplex padded with zero coordinates (d x d covariances)."""
    p = make_prior("simplex", K, 0.5, latent_dim=d)
    assert p.means.shape == (K, d) and p.d == d and p.chol.shape == (K, d, d)
    D = torch.cdist(p.means.double(), p.means.double())
    off = D[~torch.eye(K, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 2.0), atol=1e-5)
    assert p.means.double().mean(0).abs().max() < 1e-6
    assert p.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, d)


def test_rot2d_prior_geometry():
    p = rot2d_prior(10)
    assert p.means.shape == (10, 2)
    assert torch.allclose(p.means[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(p.covs[0], torch.diag(torch.tensor([0.01, 0.25])), atol=1e-6)
    for k in range(10):
        th = 2 * math.pi * k / 10
        R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        assert torch.allclose(p.means[k], R @ p.means[0], atol=1e-6)
        assert torch.allclose(p.covs[k], R @ p.covs[0] @ R.T, atol=1e-6)
        assert abs(float(p.means[k].norm()) - 1.0) < 1e-6
    z, k = p.sample(40000, generator=torch.Generator().manual_seed(1), return_modes=True)
    counts = torch.bincount(k, minlength=10).float()
    assert (counts / 40000 - 0.1).abs().max() < 0.01
    zk = z[k == 2]
    assert torch.allclose(torch.cov(zk.T), p.covs[2], atol=0.01)


def test_stratified_samples_balanced():
    p = make_prior("simplex")
    z = p.sample_stratified(100, generator=torch.Generator().manual_seed(0))
    nearest = torch.cdist(z, p.means).argmin(1)
    assert (torch.bincount(nearest, minlength=10) >= 5).all()


def test_gaussian_kl_matches_torch_distributions():
    p = rot2d_prior(10)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 10, 2, generator=g)
    sigma = torch.rand(3, 10, 2, generator=g) + 0.1
    kl = gaussian_kl_to_prior(mu, sigma, p)
    from torch.distributions import MultivariateNormal

    for b in range(3):
        for k in range(10):
            q = MultivariateNormal(mu[b, k], torch.diag(sigma[b, k] ** 2))
            pk = MultivariateNormal(p.means[k], scale_tril=p.chol[k])
            assert abs(float(torch.distributions.kl_divergence(q, pk)) - float(kl[b, k])) < 1e-4


# ------------------------------------------------------------------------------------------------ metrics
def test_protocol_perfect_and_permuted():
    labels = np.repeat(np.arange(10), 5)
    perm = np.random.RandomState(0).permutation(10)
    probs = np.eye(10)[perm[labels]] * 0.9 + 0.01
    acc, c2m, M = protocol_accuracy(probs, labels)
    assert acc == 1.0
    assert c2m == {c: int(perm[c]) for c in range(10)}
    assert active_modes(probs) == 10


def test_protocol_greedy_order_matters():
    # 3 classes, 3 modes. Class 1 is the most confident (max 0.9, on mode 0); class 0 also prefers mode 0
    # (0.6) but must take its second choice, mode 2 (0.3) -- a class-index order would give class 0 mode 0.
    M_rows = {0: [0.6, 0.1, 0.3], 1: [0.9, 0.05, 0.05], 2: [0.2, 0.7, 0.1]}
    M = np.array([M_rows[c] for c in range(3)])
    assert greedy_class_to_mode(M) == {1: 0, 2: 1, 0: 2}
    # images: each image's q_D equals its class row; argmax of a class-0 image is mode 0 -> read as class 1
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = M[labels]
    acc, c2m, _ = protocol_accuracy(probs, labels, n_classes=3)
    assert c2m == {1: 0, 2: 1, 0: 2}
    assert acc == pytest.approx(4 / 6)
    # mixed case: class-0 images split between mode 0 and mode 2
    probs2 = np.array(
        [[0.8, 0.0, 0.2], [0.4, 0.0, 0.6], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.2, 0.7, 0.1]]
    )
    acc2, c2m2, _ = protocol_accuracy(probs2, labels, n_classes=3)
    assert c2m2 == {1: 0, 2: 1, 0: 2}
    assert acc2 == pytest.approx(5 / 6)


def test_usage_kl_label_free_balance():
    from gmwae_fast.train.metrics import usage_kl

    K = 4
    assert usage_kl(np.eye(K)[np.arange(8) % K]) == 0.0  # equal mode sizes
    assert math.isclose(usage_kl(np.eye(K)[np.zeros(5, int)]), math.log(K))  # everything in one mode
    probs = np.eye(K)[[0, 0, 0, 1, 1, 2]] * 0.7 + 0.075  # sizes 3, 2, 1, 0 of 6
    u = np.array([3, 2, 1]) / 6
    assert math.isclose(usage_kl(probs), float((u * np.log(K * u)).sum()), rel_tol=1e-12)


def test_active_modes_threshold():
    probs = np.zeros((1000, 10))
    probs[:985, 0] = 1
    probs[985:995, 1] = 1  # 1.0% -> active
    probs[995:, 2] = 1  # 0.5% -> not
    assert active_modes(probs) == 2


# ------------------------------------------------------------------------------------------------ checkpoints
def test_atomic_save_keeps_old_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    ck.atomic_save({"step": 1, "w": torch.arange(5)}, path)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        ck.atomic_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    st = ck.load_checkpoint(path)
    assert st["step"] == 1 and torch.equal(st["w"], torch.arange(5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left behind


# ------------------------------------------------------------------------------------------------ CLI
TINY = [
    "--train-subset",
    "256",
    "--test-subset",
    "200",
    "--batch-size",
    "16",
    "--enc-channels",
    "8",
    "--dec-channels",
    "8",
    "--hidden",
    "8",
    "--pretrain-steps",
    "3",
    "--eval-every",
    "4",
    "--log-every",
    "2",
    "--eval-recon",
    "20",
    "--no-kmeans",
    "--no-progress",
    "--threads",
    "1",
]
# The trainer-logic tests pin the reparameterisation to the plain-torch backend (independent of how the
# extension was built); test_tiny_end_to_end_with_figures runs everything on "auto".
REF = ["--reparam-backend", "reference"]


def _run(tmp_path, name, *extra, figures=False):
    out = tmp_path / name
    argv = ["--data-dir", str(DATA), "--out", str(out), *TINY, *extra]
    if not figures:
        argv.append("--no-figures")
    return main(argv), out


@pytest.mark.parametrize(
    "bad",
    [
        ["--model", "ae"],
        ["--prior", "cube"],
        ["--steps", "0"],
        ["--steps", "x"],
        ["--lr", "-1"],
        ["--lam", "nan"],
        ["--batch-size", "-3"],
        ["--device", "tpu"],
        ["--mmd-backend", "bogus"],
        ["--prior", "rot2d", "--latent-dim", "5"],
        ["--dataset", "cifar"],
        ["--steps", "100", "--lr-decay-from", "100"],
        ["--lr", "1e-4", "--lr-final", "1e-3"],
        ["--lr-final", "-1"],
        ["--mode-prune", "1"],
        ["--mode-prune", "-0.1"],
        ["--consistency", "-1"],
        ["--aug-scale", "1"],
        ["--aug-rotate", "nan"],
        ["--balance", "-2"],
        ["--ema", "1"],
        ["--ema", "-0.5"],
    ],
)
def test_invalid_options_are_argparse_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(bad + ["--out", "/nonexistent/never"])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_main_sh_trainer_command_is_valid():
    """scripts/main.sh's training command (continued lines joined, shell variables filled in) parses and validates,
    with the recipe applied, so a renamed or mistyped option fails here rather than on a newcomer's machine."""
    import shlex

    from gmwae_fast.train.cli import explicit_options
    from gmwae_fast.train.config import TrainConfig

    text = (Path(__file__).resolve().parents[1] / "scripts" / "main.sh").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if "-m gmwae_fast.train " in ln]
    argv = shlex.split(line.replace('"$DATA"', "data").replace('"$@"', ""))
    argv = argv[argv.index("gmwae_fast.train") + 1 :]
    cfg = TrainConfig.from_args(build_parser().parse_args(argv), explicit_options(argv))
    cfg.validate()
    assert cfg.recipe == "robust" and cfg.consistency > 0 and cfg.balance > 0 and cfg.mode_prune > 0
    assert cfg.model == "gmwae" and cfg.steps >= 500 and "--seed" in argv  # the continued line was joined


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "none"), "--resume"])
    assert e.value.code == 2


def test_missing_data_message(tmp_path, capsys):
    with pytest.raises(MissingDataError) as e:
        load_mnist(str(tmp_path), download=False)
    msg = str(e.value)
    for f in MNIST_FILES:
        assert f in msg
    assert "GMWAE_DATA" in msg and "--data-dir" in msg
    rc = main(["--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "GMWAE_DATA" in err and "train-images-idx3-ubyte" in err


@needs_data
def test_tiny_end_to_end_with_figures(tmp_path):
    rc, out = _run(tmp_path, "e2e", "--steps", "6", figures=True)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    for k in (
        "test_accuracy",
        "hungarian_accuracy",
        "nmi",
        "ari",
        "active_modes",
        "usage_kl",
        "recon_l2",
        "bernoulli_nll",
        "mmd",
        "steps",
        "wall_s",
        "device",
        "mmd_backend",
        "config",
    ):
        assert k in s
    assert s["steps"] == 6 and 0 <= s["test_accuracy"] <= s["hungarian_accuracy"] <= 1 and 1 <= s["active_modes"] <= 10
    assert 0 <= s["nmi"] <= 1 and -1 <= s["ari"] <= 1
    assert s["mmd_backend"] not in ("", None, "auto")
    assert s["config"]["mmd_backend"] == "auto"
    for f in (
        "fig4a_reconstructions",
        "fig4b_samples_per_mode",
        "fig4c_samples_scaled",
        "fig5a_interp_data",
        "fig5b_interp_modes",
        "fig7a_heatmap",
        "fig7b_accuracy",
        "fig2a_loss",
    ):
        assert (out / "figures" / f"{f}.png").stat().st_size > 100
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(l["kind"] == "eval" for l in lines) and any(l["kind"] == "train" for l in lines)
    assert (out / "checkpoints" / "last.pt").exists()
    from gmwae_fast.train.compare import main as compare_main

    assert compare_main([str(out), str(out), "--labels", "a", "b", "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 100


@needs_data
def test_rot2d_and_gmvae_init_from(tmp_path):
    rc, out = _run(
        tmp_path, "wae2d", "--prior", "rot2d", "--steps", "4", "--mmd-backend", "reference", *REF, figures=True
    )
    assert rc == 0
    assert (out / "figures" / "fig3_latent2d.png").exists()
    assert json.loads((out / "summary.json").read_text())["mmd_backend"] == "reference"
    rc, out2 = _run(
        tmp_path,
        "vae2d",
        "--model",
        "gmvae",
        "--prior",
        "rot2d",
        "--steps",
        "4",
        "--beta",
        "20",
        "--init-from",
        str(out / "checkpoints" / "last.pt"),
        *REF,
    )
    assert rc == 0
    s = json.loads((out2 / "summary.json").read_text())
    assert s["model"] == "gmvae" and s["config"]["beta"] == 20


def _final_state(out):
    return ck.load_checkpoint(out / "checkpoints" / "last.pt")


@needs_data
@pytest.mark.parametrize("extra", [[], ["--consistency", "5", "--balance", "3"]], ids=["paper", "regularised"])
def test_resume_is_identical_to_uninterrupted(tmp_path, extra):
    """Also with the q_D regularisers: the consistency warps come from the checkpointed generator."""
    common = ["--steps", "9", "--ckpt-every", "3", "--seed", "3", "--lr-decay-from", "4", *REF, *extra]
    rc, full = _run(tmp_path, "full", *common)
    assert rc == 0
    rc, part = _run(tmp_path, "part", *common, "--debug-interrupt-at-step", "5")  # as if Ctrl-C at step 5
    assert rc == EXIT_INTERRUPTED
    assert _final_state(part)["step"] == 5
    rc, _ = _run(tmp_path, "part", *common, "--resume")
    assert rc == 0
    a, b = _final_state(full), _final_state(part)
    assert a["step"] == b["step"] == 9
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    ma = (full / "metrics.jsonl").read_text()
    mb = (part / "metrics.jsonl").read_text()
    assert ma == mb
    train = [json.loads(l) for l in ma.splitlines() if json.loads(l)["kind"] == "train"]
    for key in ("consistency", "balance"):
        assert all((key in r) == bool(extra) for r in train)
        if extra:
            assert all(r[key] > 0 for r in train)
    lrs = [r["lr"] for r in train]
    # logged at steps 2, 4 (updates 1, 3: constant), 6, 8, 9 (updates 5, 7, 8: annealed)
    assert lrs[:2] == [5e-4, 5e-4] and all(x > y for x, y in zip(lrs[1:], lrs[2:])), lrs
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((part / "summary.json").read_text())
    for k in ("test_accuracy", "recon_l2", "bernoulli_nll", "mmd", "active_modes"):
        assert sa[k] == sb[k]


@needs_data
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    rc, out = _run(tmp_path, "nan", "--steps", "10", "--ckpt-every", "2", "--debug-nan-at-step", "6", *REF)
    assert rc == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 6" in err and "last good checkpoint" in err
    st = _final_state(out)
    assert st["step"] == 4
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()
    # and it can be resumed from there
    rc, _ = _run(tmp_path, "nan", "--steps", "6", "--ckpt-every", "2", "--resume", *REF)
    assert rc == 0


def test_lr_schedule():
    from gmwae_fast.train.config import TrainConfig, lr_at

    argv = ["--steps", "110", "--lr", "1e-3", "--lr-decay-from", "10", "--lr-final", "1e-5"]
    a = TrainConfig.from_args(build_parser().parse_args(argv))
    assert [lr_at(s, a) for s in (0, 9, 10)] == [1e-3, 1e-3, 1e-3]
    assert lr_at(60, a) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert lr_at(110, a) == pytest.approx(1e-5) and lr_at(500, a) == pytest.approx(1e-5)
    lrs = [lr_at(s, a) for s in range(10, 111)]
    assert all(x > y for x, y in zip(lrs, lrs[1:]))
    const = TrainConfig.from_args(build_parser().parse_args(["--steps", "50"]))
    assert {lr_at(s, const) for s in range(60)} == {5e-4}


class _CountingDecoder(torch.nn.Module):
    """A tiny decoder z (N, d) -> logits (N, 1, 28, 28) that records how many rows it decoded."""

    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, 784, dtype=torch.float64)
        self.rows = []

    def decode(self, z):
        lead = z.shape[:-1]
        self.rows.append(z.reshape(-1, z.shape[-1]).shape[0])
        return self.lin(z.reshape(-1, z.shape[-1])).view(*lead, 1, 28, 28)


def _mode_problem(B=7, K=5, d=3, confident=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 28, 28, generator=g, dtype=torch.float64)
    z = torch.randn(B, K, d, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(B, K, generator=g, dtype=torch.float64) * (12.0 if confident else 0.3)
    logits.requires_grad_(True)
    return x, z, logits


@pytest.mark.parametrize("cost", ["l2", "bernoulli"])
def test_mode_expectation_exact_and_pruned(cost):
    from gmwae_fast.train.losses import _bernoulli_nll, _l2_cost, kept_modes, mode_expectation

    fn = {"l2": _l2_cost, "bernoulli": _bernoulli_nll}[cost]
    dec = _CountingDecoder(3)
    x, z, logits = _mode_problem()
    B, K = logits.shape
    pi = logits.softmax(-1)
    # every (b, k) cost by brute force, then the exact expectation
    c = torch.stack([torch.stack([fn(x[b : b + 1], dec.decode(z[b, k][None]))[0] for k in range(K)]) for b in range(B)])
    exact = (pi * c).sum(1).mean()
    dec.rows.clear()
    got = mode_expectation(dec, x, z, pi, fn, 0.0)
    assert dec.rows == [B * K]
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=0)
    # pruned: only the kept (b, k) are decoded, and the expectation is renormalised over them
    eps = 1e-3
    keep = (pi > eps) | (pi == pi.amax(1, keepdim=True))
    assert torch.equal(keep, kept_modes(pi, eps))
    assert 0 < keep.sum() < B * K, "the test problem must prune something"
    w = torch.where(keep, pi, torch.zeros_like(pi))
    want = ((w / w.sum(1, keepdim=True)) * c).sum(1).mean()
    dec.rows.clear()
    got = mode_expectation(dec, x, z, pi, fn, eps)
    assert dec.rows == [int(keep.sum())]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # within the documented bound of the exact value: dropped mass times the cost spread
    dropped = (pi * ~keep).sum(1)
    assert (got - exact).abs() <= (dropped * (c.amax(1) - c.amin(1))).mean() + 1e-12
    # gradients (z, logits, decoder weights) against the brute-force renormalised form
    gz, gl, gw = torch.autograd.grad(got, (z, logits, dec.lin.weight), retain_graph=True)
    wz, wl, ww = torch.autograd.grad(want, (z, logits, dec.lin.weight))
    for a, b in ((gz, wz), (gl, wl), (gw, ww)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (gz[~keep] == 0).all()  # dropped latents get no reconstruction gradient


def test_mode_expectation_prune_below_every_prob_is_exact():
    from gmwae_fast.train.losses import _l2_cost, mode_expectation

    dec = _CountingDecoder(3)
    x, z, logits = _mode_problem(confident=False)
    pi = logits.softmax(-1)
    assert pi.min() > 1e-3
    a = mode_expectation(dec, x, z, pi, _l2_cost, 0.0)
    b = mode_expectation(dec, x, z, pi, _l2_cost, 1e-3)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    ga = torch.autograd.grad(a, (z, logits), retain_graph=True)
    gb = torch.autograd.grad(b, (z, logits))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-13)


@needs_data
def test_mode_prune_trains_and_is_recorded(tmp_path):
    rc, out = _run(tmp_path, "prune", "--steps", "4", "--mode-prune", "1e-3", *REF)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["mode_prune"] == 1e-3 and math.isfinite(s["recon_l2"])
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    dec = [r["decoded_modes"] for r in recs if r["kind"] == "train"]
    assert dec and all(1 <= v <= 10 for v in dec)


def test_parser_defaults():
    a = build_parser().parse_args([])
    assert (a.model, a.prior, a.lr, a.lam, a.modes, a.mmd_backend) == ("gmwae", "simplex", 5e-4, 500.0, 10, "auto")
    # the paper's settings (section 3): squared-L2 cost without rescaling, batch 100, decoder width 128
    assert (a.recon_scale, a.batch_size, a.dec_channels) == (1.0, 100, 128)
    assert a.mode_prune == 0.0 and a.consistency == 0.0 and a.balance == 0.0  # the paper's exact objective unless asked


def test_profile_step_reports_each_backend(tmp_path):
    """The MMD-share profiler runs a real step per backend and writes consistent JSON (tiny sizes)."""
    from gmwae_fast.train import profile_step

    out = tmp_path / "profile.json"
    rc = profile_step.main(
        [
            "--batch-size",
            "3",
            "--dec-channels",
            "8",
            "--backends",
            "cpu",
            "reference",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert (res["batch_size"], res["modes"], res["dec_channels"]) == (3, 10, 8)
    assert set(res["backends"]) == {"cpu", "reference"}
    for be, r in res["backends"].items():
        assert r["resolved"] == be
        assert r["step_s"] > 0 and r["mmd_fwd_bwd_s"] > 0
        # the JSON keeps the times to 1 us and the share to 0.001 (computed before rounding)
        assert r["mmd_share"] == pytest.approx(r["mmd_fwd_bwd_s"] / r["step_s"], rel=0.01, abs=1e-3)


@needs_data
def test_profile_step_on_a_checkpoint_with_pruning(tmp_path):
    """--checkpoint takes the model sizes from the run's config; --mode-prune is recorded with its decodes."""
    from gmwae_fast.train import profile_step

    rc, run = _run(tmp_path, "prof", "--steps", "2", *REF)
    assert rc == 0
    out = tmp_path / "profile.json"
    rc = profile_step.main(
        [
            "--checkpoint",
            str(run / "checkpoints" / "last.pt"),
            "--data-dir",
            str(DATA),
            "--batch-size",
            "5",
            "--mode-prune",
            "0.05",
            "--backends",
            "cpu",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert (res["dec_channels"], res["mode_prune"], res["images"]) == (8, 0.05, "mnist train")
    assert 1 <= res["decoded_modes_per_image"] <= 10
    with pytest.raises(SystemExit):
        profile_step.main(["--mode-prune", "1.5"])


# ------------------------------------------------------------------------------------------------ --stop-at, select
@needs_data
def test_stop_at_pauses_and_resume_continues_the_same_run(tmp_path):
    """--stop-at S: evaluation and checkpoint at S, exit 0, no summary; --resume finishes the run exactly as an
    uninterrupted one (same schedule, same final weights)."""
    common = ["--steps", "8", "--seed", "5", "--lr-decay-from", "4", *REF]
    rc, paused = _run(tmp_path, "paused", *common, "--stop-at", "5")
    assert rc == 0 and not (paused / "summary.json").exists()
    assert ck.load_checkpoint(paused / "checkpoints" / ck.CKPT_NAME)["step"] == 5
    evals = [json.loads(x) for x in (paused / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [4, 5]
    assert main(["--data-dir", str(DATA), "--out", str(paused), *TINY, *common, "--no-figures", "--resume"]) == 0
    rc, whole = _run(tmp_path, "whole", *common)
    assert rc == 0
    a = ck.load_checkpoint(paused / "checkpoints" / ck.CKPT_NAME)
    b = ck.load_checkpoint(whole / "checkpoints" / ck.CKPT_NAME)
    assert a["step"] == b["step"] == 8
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert json.loads((paused / "summary.json").read_text())["steps"] == 8


def _train_rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if json.loads(x)["kind"] == "train"]


def build_config(argv):
    from gmwae_fast.train.cli import _parse

    return _parse(argv)


def _mutual_information(st, x):
    """I(x; k) of a checkpoint's q_D on x, in numpy (independent of metrics.mode_mutual_information)."""
    from gmwae_fast.train.config import prior_and_model

    _, model = prior_and_model(st["config"])
    model.load_state_dict(st["model"])
    model.eval()
    with torch.no_grad():
        p = model.encoder.q_d_logits(x).softmax(-1).double().numpy()
    pbar = p.mean(0)
    h_cond = -np.mean(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1))
    return float(-np.sum(pbar[pbar > 0] * np.log(pbar[pbar > 0])) - h_cond)


def test_mode_mutual_information_extremes():
    from gmwae_fast.train.metrics import mode_mutual_information

    K = 10
    one_hot = np.eye(K)[np.arange(200) % K]
    assert mode_mutual_information(one_hot) == pytest.approx(math.log(K))  # confident and even: log K
    assert mode_mutual_information(np.full((50, K), 1.0 / K)) == pytest.approx(0.0, abs=1e-12)  # no information
    assert mode_mutual_information(np.eye(K)[np.zeros(30, dtype=int)]) == pytest.approx(0.0, abs=1e-12)  # one mode
    half = np.eye(K)[np.arange(100) % 2]  # confident, two modes used evenly
    assert mode_mutual_information(half) == pytest.approx(math.log(2))


@needs_data
@pytest.mark.parametrize("score", ["mi", "consistency"])
def test_select_runs_candidates_picks_the_best_score_and_continues_it(tmp_path, capsys, score):
    from gmwae_fast.train import select

    out = tmp_path / "sel"
    targv = ["--data-dir", str(DATA), "--out", str(out), *TINY, *REF, "--no-figures"]
    targv += ["--steps", "10", "--seed", "7", "--consistency", "5", "--balance", "1"]
    args = ["--candidates", "3", "--select-at", "6", "--score", score, "--score-window", "4", "--", *targv]
    assert select.main(args) == 0
    sel = json.loads((out / select.SELECTION).read_text())
    seeds = [r["seed"] for r in sel["candidates"]]
    assert seeds == [7, 1007, 2007] and sel["score"] == score
    x = select.score_images(build_config(targv))
    assert x.shape == (select.SCORE_IMAGES, 1, 28, 28)
    scores = {}
    for s in seeds:
        run = out / "candidates" / f"seed{s}"
        st = ck.load_checkpoint(run / "checkpoints" / ck.CKPT_NAME)
        assert st["step"] == 6
        rows = [r for r in _train_rows(run / "metrics.jsonl") if 2 < r["step"] <= 6]
        assert [r["step"] for r in rows] == [4, 6]
        got = [r for r in sel["candidates"] if r["seed"] == s][0]
        assert got["scores"]["consistency"] == pytest.approx(sum(r["consistency"] for r in rows) / 2)
        assert got["scores"]["mi"] == pytest.approx(_mutual_information(st, x), rel=1e-6)
        scores[s] = got["scores"][score]
    assert len(set(scores.values())) == 3  # the seeds really differ
    assert sel["chosen_seed"] == (max if score == "mi" else min)(scores, key=scores.get)
    # The chosen run continued in --out: its first 6 steps are the candidate's, then steps 7..10.
    chosen = out / "candidates" / f"seed{sel['chosen_seed']}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["config"]["seed"] == sel["chosen_seed"]
    head = [r for r in _train_rows(out / "metrics.jsonl") if r["step"] <= 6]
    assert head == _train_rows(chosen / "metrics.jsonl")
    # Re-running the command trains nothing more.
    before = (out / "metrics.jsonl").read_text()
    assert select.main(args) == 0
    assert (out / "metrics.jsonl").read_text() == before
    err = capsys.readouterr().err
    assert "already finished" in err and f"select ({score}): seed 7 " in err


@pytest.mark.parametrize(
    "sel_args, extra, msg",
    [
        (["--select-at", "4", "--score", "consistency"], [], "--consistency"),
        (["--select-at", "10"], ["--consistency", "1"], "must lie in"),
        (["--select-at", "4"], ["--consistency", "1", "--resume"], "not a trainer option"),
        (["--select-at", "4", "--candidates", "0"], ["--consistency", "1"], "at least 1"),
        (
            ["--select-at", "4", "--score", "consistency", "--score-window", "5"],
            ["--consistency", "1", "--log-every", "10"],
            "--log-every",
        ),
    ],
)
def test_select_refuses_what_it_cannot_do(tmp_path, capsys, sel_args, extra, msg):
    from gmwae_fast.train import select

    targv = ["--data-dir", str(DATA), "--out", str(tmp_path / "x"), "--steps", "10", *extra]
    with pytest.raises(SystemExit) as e:
        select.main([*sel_args, "--", *targv])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        select.main(["--select-at", "4", *targv])  # no "--"


@needs_data
def test_select_reports_a_candidate_without_a_score(tmp_path, capsys):
    """A candidate folder whose train log has no entries in the window is one error line (exit 2), not a
    traceback and not a silent choice."""
    from gmwae_fast.train import select

    out = tmp_path / "sel"
    targv = ["--data-dir", str(DATA), "--out", str(out), *TINY, *REF, "--no-figures", "--steps", "10"]
    targv += ["--seed", "7", "--consistency", "1"]
    cand = out / "candidates" / "seed7"
    assert main([*targv, "--out", str(cand), "--stop-at", "6"]) == 0
    m = cand / "metrics.jsonl"
    m.write_text("".join(x + "\n" for x in m.read_text().splitlines() if json.loads(x)["kind"] != "train"))
    args = ["--candidates", "1", "--select-at", "6", "--score", "consistency", "--score-window", "4"]
    assert select.main([*args, "--", *targv]) == 2
    assert "no train-log entries" in capsys.readouterr().err
    assert not (out / select.SELECTION).exists()


# ------------------------------------------------------------------------------------------------ --ema
def test_weight_average_matches_the_formula():
    """a <- d a + (1 - d) w with d = min(DECAY, (1 + n) / (10 + n)); batch norm's running statistics averaged,
    its update counter copied; the average is a separate eval-mode copy without gradients."""
    from gmwae_fast.train.ema import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    avg = WeightAverage(net, 0.95)
    assert not avg.model.training and not any(p.requires_grad for p in avg.model.parameters())
    ref = {k: v.detach().double().clone() for k, v in net.state_dict().items()}
    for n in range(40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(5, 3))  # moves the running statistics
        avg.update(net)
        d = min(0.95, (1 + n) / (10 + n))
        for k, v in net.state_dict().items():
            ref[k] = v.double().clone() if not v.is_floating_point() else d * ref[k] + (1 - d) * v.double()
    assert avg.updates == 40
    got = avg.model.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert int(got["1.num_batches_tracked"]) == 40
    assert not torch.allclose(got["0.weight"], net.state_dict()["0.weight"])  # it lags the weights
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WeightAverage(net, 1.0)


def _eval_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["kind"] == "eval"]


@needs_data
def test_ema_leaves_training_unchanged_and_is_what_the_run_evaluates(tmp_path):
    """A run with --ema takes exactly the steps of the run without it (same trained weights, same raw metrics);
    its eval records and summary are the average's, recomputed here from the checkpoint; select and --init-from
    read the average."""
    from gmwae_fast.train import select
    from gmwae_fast.train.config import prior_and_model
    from gmwae_fast.train.data import subset
    from gmwae_fast.train.ema import delivered_weights
    from gmwae_fast.train.metrics import evaluate

    common = ["--steps", "9", "--seed", "4", *REF]
    rc, plain = _run(tmp_path, "plain", *common)
    assert rc == 0
    rc, avg = _run(tmp_path, "avg", *common, "--ema", "0.8")
    assert rc == 0
    a, b = _final_state(plain), _final_state(avg)
    assert "ema" not in a and b["ema"]["updates"] == 9 and b["ema"]["decay"] == 0.8
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    assert any(not torch.equal(b["ema"]["model"][k], v) for k, v in a["model"].items() if v.is_floating_point())
    ra, rb = _eval_rows(plain), _eval_rows(avg)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [4, 8, 9]
    for x, y in zip(ra, rb):
        for k in ("test_accuracy", "active_modes", "usage_kl", "recon_l2"):
            assert y["raw_" + k] == x[k], k
    # the recorded metrics are the average's
    prior, model = prior_and_model(b["config"])
    model.load_state_dict(delivered_weights(b))
    x_te, y_te = subset(*load_mnist(DATA)[2:], int(TINY[TINY.index("--test-subset") + 1]), 0)
    n_recon = int(TINY[TINY.index("--eval-recon") + 1])
    m = evaluate(model, x_te, y_te, prior, reparam_backend="reference", n_recon=n_recon, seed=4 + 1234)
    summary = json.loads((avg / "summary.json").read_text())
    assert summary["test_accuracy"] == rb[-1]["test_accuracy"] == m["test_accuracy"]
    assert summary["recon_l2"] == pytest.approx(m["recon_l2"], rel=1e-6)
    assert summary["raw_test_accuracy"] == ra[-1]["test_accuracy"]
    x = torch.rand(16, 1, 28, 28)
    assert select.mi_score(b, x) == pytest.approx(_mutual_information({**b, "model": b["ema"]["model"]}, x), rel=1e-6)
    # --init-from starts from the average
    from gmwae_fast.train.trainer import Trainer

    cfg = build_config(
        [
            "--data-dir",
            str(DATA),
            "--out",
            str(tmp_path / "init"),
            *TINY,
            *REF,
            "--init-from",
            str(avg / "checkpoints" / ck.CKPT_NAME),
        ]
    )
    tr = Trainer(cfg, torch.device("cpu"), cfg.out_dir)
    tr.setup()
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, b["ema"]["model"][k]), k


@needs_data
def test_ema_may_start_or_change_on_resume(tmp_path):
    """--ema added on --resume starts the average from the resumed weights (a resume record says so); stopping
    and resuming a run with --ema gives the uninterrupted run's average bit for bit."""
    common = ["--steps", "8", "--seed", "6", "--ckpt-every", "2", *REF]
    rc, late = _run(tmp_path, "late", *common, "--stop-at", "5")
    assert rc == 0 and "ema" not in _final_state(late)
    assert (
        main(["--data-dir", str(DATA), "--out", str(late), *TINY, *common, "--no-figures", "--resume", "--ema", "0.5"])
        == 0
    )
    st = _final_state(late)
    assert st["ema"]["updates"] == 3
    resume = [json.loads(x) for x in (late / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
    assert resume[-1]["config_changes"]["ema"] == [0.0, 0.5]
    rc, whole = _run(tmp_path, "whole", *common, "--ema", "0.5")
    assert rc == 0
    rc, parts = _run(tmp_path, "parts", *common, "--ema", "0.5", "--stop-at", "3")
    assert rc == 0 and _final_state(parts)["ema"]["updates"] == 3
    assert (
        main(["--data-dir", str(DATA), "--out", str(parts), *TINY, *common, "--no-figures", "--resume", "--ema", "0.5"])
        == 0
    )
    a, b = _final_state(whole), _final_state(parts)
    for k, v in a["ema"]["model"].items():
        assert torch.equal(b["ema"]["model"][k], v), k
    assert a["ema"]["updates"] == b["ema"]["updates"] == 8
    assert _eval_rows(whole) == [r for r in _eval_rows(parts) if r["step"] != 3]  # --stop-at adds step 3's
    for k, v in a["model"].items():  # the run that added --ema late trained exactly as the others
        assert torch.equal(st["model"][k], v), k


def test_validation_split_is_fixed_disjoint_and_reported(tmp_path):
    from gmwae_fast.train.data import split_validation

    x = torch.arange(50.0).view(50, 1, 1, 1)
    y = torch.arange(50) % 10
    a = split_validation(x, y, 12)
    b = split_validation(x, y, 12)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # the same split on every call (and for every seed)
    tr, va = set(a[0].flatten().tolist()), set(a[2].flatten().tolist())
    assert len(va) == 12 and len(tr) == 38 and not tr & va and tr | va == set(range(50))
    assert split_validation(x, y, 0)[2].numel() == 0
    with pytest.raises(ValueError, match="must leave training images"):
        split_validation(x, y, 50)


@needs_data
def test_val_size_holds_images_out_of_training_and_evaluates_them(tmp_path):
    rc, out = _run(tmp_path, "val", "--steps", "4", "--val-size", "300", "--train-subset", "2000")
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["val_size"] == 300 and s["val_images"] == 300 and s["train_images"] == 2000
    for k in ("val_accuracy", "val_hungarian_accuracy", "val_nmi", "val_ari", "val_active_modes", "val_recon_l2"):
        assert k in s, k
    assert 0 <= s["val_accuracy"] <= s["val_hungarian_accuracy"] <= 1
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r.get("kind") == "eval"]
    assert evals and all("val_accuracy" in r and "test_accuracy" in r for r in evals)
