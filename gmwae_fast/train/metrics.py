"""Evaluation: the paper's clustering-accuracy protocol, active modes, reconstruction metrics, MMD,
and a k-means-on-pixels baseline scored with the same protocol."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import gmwae_fast


def class_mode_matrix(probs: np.ndarray, labels: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """M[c, k] = mean of q_D(k|x) over the images x of class c (rows of empty classes are 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    M = np.zeros((n_classes, probs.shape[1]))
    for c in range(n_classes):
        sel = labels == c
        if sel.any():
            M[c] = probs[sel].mean(0)
    return M


def greedy_class_to_mode(M: np.ndarray) -> Dict[int, int]:
    """The paper's protocol: classes are visited in decreasing order of max_k M[c, k]; each takes the
    mode with the largest M[c, k] among the modes not yet taken (ties: lowest index). Returns
    {class: mode}; with more classes than modes the last classes get no mode."""
    C, K = M.shape
    order = sorted(range(C), key=lambda c: (-M[c].max(), c))
    free = set(range(K))
    out: Dict[int, int] = {}
    for c in order:
        if not free:
            break
        k = max(sorted(free), key=lambda j: M[c, j])
        out[c] = k
        free.discard(k)
    return out


def protocol_accuracy(probs, labels, n_classes: int = 10) -> Tuple[float, Dict[int, int], np.ndarray]:
    """Accuracy of argmax_k q_D(k|x) read through the greedy class->mode map (a mode that no class took
    counts as wrong). Returns (accuracy, {class: mode}, M)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    M = class_mode_matrix(probs, labels, n_classes)
    c2m = greedy_class_to_mode(M)
    mode_to_class = np.full(probs.shape[1], -1)
    for c, k in c2m.items():
        mode_to_class[k] = c
    pred = mode_to_class[probs.argmax(1)]
    return float((pred == labels).mean()), c2m, M


def contingency(labels, pred, n_classes: int, n_modes: int) -> np.ndarray:
    """N[c, k] = number of images of class c assigned to mode k (integer counts)."""
    N = np.zeros((n_classes, n_modes), dtype=np.int64)
    np.add.at(N, (np.asarray(labels), np.asarray(pred)), 1)
    return N


def _assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect assignment of the rows of a square ``cost`` matrix (Hungarian method with potentials,
    O(n^3)): ``col[i]`` = the column row ``i`` takes."""
    n = cost.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    p, way = np.zeros(n + 1, dtype=np.int64), np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], np.inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.zeros(n, dtype=np.int64)
    for j in range(1, n + 1):
        if p[j]:
            col[p[j] - 1] = j - 1
    return col


def hungarian_map(N: np.ndarray) -> np.ndarray:
    """The one-to-one class->mode map maximising the correctly assigned images of a contingency table ``N``
    (classes x modes): ``col[c]`` = the mode of class ``c`` (an index >= ``n_modes`` when there are fewer modes
    than classes: that class has none)."""
    n_classes, n_modes = N.shape
    n = max(n_classes, n_modes)
    padded = np.zeros((n, n))
    padded[:n_classes, :n_modes] = N
    return _assignment(-padded)[:n_classes]


def hungarian_accuracy(labels, pred, n_classes: int = 10, n_modes: int = 10) -> float:
    """Accuracy under the one-to-one class->mode map that maximises the number of correctly assigned images
    (the Hungarian map; the paper's greedy map can only do as well or worse)."""
    N = contingency(labels, pred, n_classes, n_modes)
    col = hungarian_map(N)
    hits = sum(int(N[c, k]) for c, k in enumerate(col) if k < n_modes)
    return float(hits / max(1, len(np.asarray(labels))))


def nmi(labels, pred) -> float:
    """Normalised mutual information of two labelings, arithmetic normalisation: ``I(L; P) / ((H(L) + H(P)) / 2)``
    (1 when one determines the other; 0 when independent; 1 when both are constant)."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    N = contingency(labels, pred, int(labels.max()) + 1, int(pred.max()) + 1).astype(np.float64)
    n = N.sum()
    pij = N / n
    pi, pj = pij.sum(1), pij.sum(0)
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / np.outer(pi, pj)[nz])).sum())
    h = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())  # noqa: E731
    den = (h(pi) + h(pj)) / 2
    return 1.0 if den == 0 else max(0.0, mi / den)


def ari(labels, pred) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie, 1985): 1 for identical partitions, ~0 in
    expectation for independent ones."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    N = contingency(labels, pred, int(labels.max()) + 1, int(pred.max()) + 1).astype(np.float64)
    comb = lambda m: m * (m - 1) / 2  # noqa: E731
    sum_ij, sum_a, sum_b, total = comb(N).sum(), comb(N.sum(1)).sum(), comb(N.sum(0)).sum(), comb(N.sum())
    expected = sum_a * sum_b / total if total else 0.0
    maximum = (sum_a + sum_b) / 2
    return 1.0 if maximum == expected else float((sum_ij - expected) / (maximum - expected))


def mode_sizes(probs) -> np.ndarray:
    """(K,) number of images whose argmax of q_D(k|x) is mode k; ``probs`` (N, K)."""
    probs = np.asarray(probs)
    return np.bincount(probs.argmax(1), minlength=probs.shape[1])


def active_modes(probs, threshold: float = 0.01) -> int:
    """Number of modes that are the argmax of q_D(k|x) for at least ``threshold`` of the images."""
    return int((mode_sizes(probs) >= threshold * len(probs)).sum())


def usage_kl(probs) -> float:
    """KL(u || uniform) = sum_k u_k log(K u_k), u_k the fraction of images whose argmax of q_D(k|x) is k: how far
    the mode sizes are from the uniform prior p_D, without labels (0 = equal sizes, log K = one mode). A
    merge of two classes into one mode shows here."""
    u = mode_sizes(probs) / len(probs)
    nz = u > 0
    return float((u[nz] * np.log(len(u) * u[nz])).sum())


def mode_mutual_information(probs) -> float:
    """I(x; k) = H(mean_x q_D(.|x)) - mean_x H(q_D(.|x)) in nats for ``probs`` (N, K) = q_D(k|x): high when every
    image sits confidently in one mode and the modes are used evenly (at most log K); no labels. The clustering
    objective of IIC (Ji et al., 2019), here a label-free score of a trained model (``gmwae_fast.train.select``)."""
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64).clamp_min(0)
    p = p / p.sum(1, keepdim=True)
    xlogx = lambda t: torch.where(t > 0, t * t.clamp_min(1e-300).log(), torch.zeros_like(t))  # noqa: E731
    h_mean = -xlogx(p.mean(0)).sum()
    mean_h = -xlogx(p).sum(1).mean()
    return float(h_mean - mean_h)


@torch.no_grad()
def encode_all(model, x: torch.Tensor, batch: int = 1000):
    """(mu, sigma, pi) of the whole set, in eval mode, in chunks."""
    mus, sigmas, pis = [], [], []
    for i in range(0, len(x), batch):
        mu, sr, lg = model.encoder(x[i : i + batch])
        mus.append(mu)
        sigmas.append(F.softplus(sr))
        pis.append(torch.softmax(lg, -1))
    return torch.cat(mus), torch.cat(sigmas), torch.cat(pis)


@torch.no_grad()
def evaluate(
    model,
    x_test,
    y_test,
    prior,
    backend: str = "auto",
    reparam_backend: str = "auto",
    n_recon: int = 500,
    seed: int = 1234,
    decode_batch: int = 100,
) -> Dict:
    """All metrics on the held-out set: accuracy (the paper's greedy map and the Hungarian map), NMI, ARI, active
    modes, the heatmap and the confusion matrix (class x mode counts, with the Hungarian map) on every test image,
    reconstruction L2, Bernoulli NLL (both expectations over q_D, summed over pixels, mean over images)
    and the weighted MMD against as many prior samples, on the first ``n_recon`` test images."""
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        mu, sigma, pi = encode_all(model, x_test.to(dev))
        probs = pi.cpu().numpy()
        labels = y_test.cpu().numpy()
        acc, c2m, M = protocol_accuracy(probs, labels)
        pred = probs.argmax(1)
        confusion = contingency(labels, pred, 10, probs.shape[1])
        out = {
            "test_accuracy": acc,
            "hungarian_accuracy": hungarian_accuracy(labels, pred, 10, probs.shape[1]),
            "confusion": confusion.tolist(),  # [class][mode] counts of the hard assignment argmax_k q(k|x)
            "hungarian_map": [int(k) for k in hungarian_map(confusion)],
            "nmi": nmi(labels, pred),
            "ari": ari(labels, pred),
            "active_modes": active_modes(probs),
            "usage_kl": usage_kl(probs),
            "class_to_mode": c2m,
            "heatmap": M.tolist(),
            "mode_usage": mode_sizes(probs).tolist(),
        }
        n = min(n_recon, len(x_test))
        g = torch.Generator(device=dev).manual_seed(seed)
        xs = x_test[:n].to(dev)
        l2s, nlls, zs, pis = [], [], [], []
        for i in range(0, n, decode_batch):
            xb = xs[i : i + decode_batch]
            mu_b, sr_b, lg_b = model.encoder(xb)
            z, p = gmwae_fast.gm_reparameterize(mu_b, sr_b, lg_b, seed=seed + i, backend=reparam_backend)
            logits = model.decode(z)
            xr = torch.sigmoid(logits)
            l2 = (xr - xb.unsqueeze(1)).pow(2).flatten(2).sum(-1)
            nll = (
                F.binary_cross_entropy_with_logits(logits, xb.unsqueeze(1).expand_as(logits), reduction="none")
                .flatten(2)
                .sum(-1)
            )
            l2s.append((p * l2).sum(1))
            nlls.append((p * nll).sum(1))
            zs.append(z)
            pis.append(p)
        z, p = torch.cat(zs), torch.cat(pis)
        pz = prior.sample_stratified(n * prior.K, generator=g)
        out["recon_l2"] = float(torch.cat(l2s).mean())
        out["bernoulli_nll"] = float(torch.cat(nlls).mean())
        out["mmd"] = float(
            gmwae_fast.fast_imq_mmd(z, pz, x_weights=p, backend=backend, scales=gmwae_fast.GAUJAC2019_SCALES)
        )
        return out
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# k-means on pixels
# --------------------------------------------------------------------------------------------------
def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, n_init: int = 3):
    """Lloyd's algorithm with k-means++ seeding (best of n_init by inertia). x (N, D) float."""
    g = torch.Generator().manual_seed(seed)
    best = None
    xx = (x * x).sum(1)
    for _ in range(n_init):
        idx = [int(torch.randint(len(x), (1,), generator=g))]
        d2 = ((x - x[idx[0]]) ** 2).sum(1)
        for _j in range(1, k):
            nxt = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
            idx.append(nxt)
            d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
        C = x[idx].clone()
        for _it in range(iters):
            D = xx[:, None] - 2 * x @ C.T + (C * C).sum(1)[None]
            a = D.argmin(1)
            newC = torch.zeros_like(C).index_add_(0, a, x)
            cnt = torch.bincount(a, minlength=k).to(x.dtype)
            empty = cnt == 0
            newC = newC / cnt.clamp_min(1)[:, None]
            newC[empty] = C[empty]
            if torch.allclose(newC, C):
                C = newC
                break
            C = newC
        D = xx[:, None] - 2 * x @ C.T + (C * C).sum(1)[None]
        inertia = float(D.min(1).values.clamp_min(0).sum())
        if best is None or inertia < best[0]:
            best = (inertia, C)
    return best[1]


def kmeans_baseline(x_train, x_test, y_test, k: int = 10, seed: int = 0, n_fit: Optional[int] = None) -> float:
    """Fit k-means on training pixels, assign test images to the nearest centroid (a one-hot q_D) and
    score with the same greedy protocol."""
    xtr = x_train.reshape(len(x_train), -1).float()
    if n_fit is not None and n_fit < len(xtr):
        xtr = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:n_fit]]
    C = kmeans(xtr, k, seed=seed)
    xt = x_test.reshape(len(x_test), -1).float()
    a = ((xt * xt).sum(1)[:, None] - 2 * xt @ C.T + (C * C).sum(1)[None]).argmin(1)
    probs = F.one_hot(a, k).numpy().astype(np.float64)
    return protocol_accuracy(probs, y_test.numpy())[0]
