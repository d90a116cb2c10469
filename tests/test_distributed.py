"""``fast_imq_mmd(..., process_group=...)`` against the single-process float64 reference on the concatenation.

Each world size (2 and 3 ranks, gloo on 127.0.0.1) is spawned once; every case runs inside that one group and each
rank records, per case, an empty string (passed) or the failure. The pytest items below then report each
(world, case) separately. A failing rank never leaves the others waiting: every case makes the same collective
calls on every rank and failures are caught per case.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gmwae_fast

D = 3  # feature dimension of every equivalence case
K = 3  # group size of the grouped cases
SHARDS = {2: ((7, 4), (0, 9)), 3: ((5, 0, 6), (3, 4, 2))}  # groups per rank (uneven; with an empty shard)
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


# ---------------------------------------------------------------------------------------------------------------
# Cases (the same list in the parent, for the pytest ids, and in every rank)
# ---------------------------------------------------------------------------------------------------------------


def _equivalence_cases(world: int) -> list[dict]:
    cases = []
    for shards, layout, weighted, unbiased, dtype, backend in itertools.product(
        SHARDS[world], ("plain", "grouped"), (False, True), (True, False), ("f64", "f32"), ("cpu", "reference")
    ):
        # "none" on half of the combinations, so that each value of every other factor meets both reductions
        odd = (layout == "grouped") + weighted + unbiased + (dtype == "f32") + (backend == "cpu")
        reduction = "none" if odd % 2 else "sum"
        cases.append(
            dict(
                shards=shards,
                layout=layout,
                weighted=weighted,
                unbiased=unbiased,
                dtype=dtype,
                backend=backend,
                reduction=reduction,
                y_mode="const",
                options={},
            )
        )
    shards = SHARDS[world][1]
    extra = [  # y sides that need gradients, y weights, the other keyword options
        dict(layout="grouped", weighted=True, y_mode="grad_weighted", options={}),
        dict(layout="plain", weighted=False, y_mode="grad_only", options={}),  # only y needs a gradient
        dict(layout="plain", weighted=True, y_mode="grad", options={"eps": 0.3}),
        dict(layout="grouped", weighted=True, y_mode="const", options={"scales": (0.5, 2.0), "sigma2": 1.7}),
        dict(layout="plain", weighted=True, y_mode="grad", options={"bandwidths": (0.2, 3.0, 40.0)}),
        dict(layout="grouped", weighted=True, y_mode="const", options={"validate": True}),
    ]
    for i, e in enumerate(extra):
        for backend, dtype, reduction in (("cpu", "f64", "sum"), ("cpu", "f32", "none"), ("reference", "f64", "none")):
            cases.append(dict(e, shards=shards, unbiased=True, dtype=dtype, backend=backend, reduction=reduction))
    if world == 2:  # Triton under the interpreter: tiny
        for layout, reduction in (("plain", "sum"), ("grouped", "none")):
            cases.append(
                dict(
                    shards=(2, 1),
                    layout=layout,
                    weighted=True,
                    unbiased=True,
                    dtype="f32",
                    backend="triton",
                    reduction=reduction,
                    y_mode="grad_weighted",
                    options={},
                )
            )
    for c in cases:
        c["id"] = "-".join(
            [
                c["layout"],
                "w" if c["weighted"] else "uw",
                "unb" if c["unbiased"] else "bia",
                c["dtype"],
                c["backend"],
                "s" + "_".join(map(str, c["shards"])),
                c["reduction"],
                c["y_mode"],
            ]
            + [f"{k}={v}" for k, v in c["options"].items()]
        )
    return cases


ERROR_CASES = (
    "mismatched_d",
    "mismatched_dtype",
    "grouped_and_plain",
    "weights_on_some_ranks",
    "bad_shape_one_rank",
    "different_options",
    "all_empty",
    "not_a_group",
    "backend_unusable_on_one_rank",
    "validate_on_some_ranks",
    "list_as_weights_on_one_rank",
    "not_a_tensor_on_one_rank",
)
OTHER_CASES = (
    "ddp_rule",
    "imqmmdloss_module",
    "double_backward_raises",
    "extreme_weights",
    "contract_hostile",
    "destroyed_group",
)


def _case_ids(world: int) -> list[str]:
    return [c["id"] for c in _equivalence_cases(world)] + list(ERROR_CASES) + list(OTHER_CASES)


# ---------------------------------------------------------------------------------------------------------------
# What every rank runs
# ---------------------------------------------------------------------------------------------------------------


def _global_data(case: dict, seed: int):
    """The global sample (same on every rank): x (N_groups[, K], D), y, raw weights."""
    g = torch.Generator().manual_seed(seed)
    groups = sum(case["shards"])
    shape = (groups, K, D) if case["layout"] == "grouped" else (groups * K, D)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(13, D, generator=g, dtype=torch.float64) + 0.4
    xw = 0.1 + 2.0 * torch.rand(shape[:-1], generator=g, dtype=torch.float64)
    yw = 0.1 + 2.0 * torch.rand(13, generator=g, dtype=torch.float64)
    return x, y, xw, yw


def _shard(t: torch.Tensor, counts, rank: int, unit: int) -> torch.Tensor:
    start = sum(counts[:rank]) * unit
    return t[start : start + counts[rank] * unit]


def _leaf(t: Optional[torch.Tensor], dtype, grad: bool):
    return None if t is None else t.detach().to(dtype).clone().requires_grad_(grad)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _check_equivalence(case: dict, index: int, rank: int, world: int) -> None:
    dtype = torch.float64 if case["dtype"] == "f64" else torch.float32
    x, y, xw, yw = _global_data(case, 1000 + index)
    unit = K if case["layout"] == "plain" else 1
    y_counts = [13 // world + (1 if r < 13 % world else 0) for r in range(world)]
    y_grad = case["y_mode"] != "const"
    x_grad = case["y_mode"] != "grad_only"
    xw = xw if case["weighted"] else None
    yw = yw if case["y_mode"] == "grad_weighted" else None
    local = [
        _leaf(_shard(x, case["shards"], rank, unit), dtype, x_grad),
        _leaf(None if xw is None else _shard(xw, case["shards"], rank, unit), dtype, x_grad),
        _leaf(_shard(y, y_counts, rank, 1), dtype, y_grad),
        _leaf(None if yw is None else _shard(yw, y_counts, rank, 1), dtype, y_grad),
    ]
    full = [
        _leaf(t, torch.float64, True)
        for t in (x.to(dtype), None if xw is None else xw.to(dtype), y.to(dtype), None if yw is None else yw.to(dtype))
    ]
    kw = dict(unbiased=case["unbiased"], reduction=case["reduction"], **case["options"])
    got = gmwae_fast.fast_imq_mmd(
        local[0], local[2], local[1], local[3], backend=case["backend"], process_group=dist.group.WORLD, **kw
    )
    want = gmwae_fast.fast_imq_mmd(full[0], full[2], full[1], full[3], backend="reference", **kw)
    tol = TOL[dtype]
    assert got.dtype == dtype, f"result dtype {got.dtype}, expected {dtype}"
    _close("value", got, want, tol)
    cot = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
    (got.double() * cot).sum().backward()
    (want * cot).sum().backward()
    names = ("x", "x_weights", "y", "y_weights")
    for name, loc, ful, counts, u in zip(
        names, local, full, (case["shards"],) * 2 + (y_counts,) * 2, (unit, unit, 1, 1)
    ):
        if loc is None or not loc.requires_grad:
            continue
        assert loc.grad is not None, f"no gradient for the local {name}"
        _close(f"grad {name}", loc.grad, _shard(ful.grad, counts, rank, u), tol)


def _expect_error(exc_type, pattern: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except exc_type as exc:
        assert pattern in str(exc), f"error {exc!r} does not mention {pattern!r}"
        return
    raise AssertionError(f"no {exc_type.__name__} raised (expected one mentioning {pattern!r})")


def _check_error(name: str, rank: int, world: int) -> None:
    wd = dist.group.WORLD
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, D, generator=g, dtype=torch.float64)  # the same on every rank
    y = torch.randn(5, D, generator=g, dtype=torch.float64) + 0.5
    mmd = gmwae_fast.fast_imq_mmd
    if name == "mismatched_d":
        d = 3 if rank == 0 else 4
        _expect_error(
            ValueError, "feature dimension d", lambda: mmd(torch.randn(4, d), torch.randn(5, d), process_group=wd)
        )
    elif name == "mismatched_dtype":
        dt = torch.float32 if rank == 0 else torch.float64
        _expect_error(ValueError, "x's dtype", lambda: mmd(x.to(dt), y.to(dt), process_group=wd))
    elif name == "grouped_and_plain":
        xs = x.view(2, 2, D) if rank == 0 else x
        _expect_error(ValueError, "plain or (B, K, d) grouped", lambda: mmd(xs, y, process_group=wd))
    elif name == "weights_on_some_ranks":
        w = torch.rand(4, dtype=torch.float64) if rank == 1 else None
        _expect_error(ValueError, "whether x_weights is given", lambda: mmd(x, y, w, process_group=wd))
    elif name == "bad_shape_one_rank":
        w = torch.rand(4 if rank != 1 else 3, dtype=torch.float64)
        pattern = "leading shape of x" if rank == 1 else "rank(s) [1] passed invalid input"
        _expect_error(ValueError, pattern, lambda: mmd(x, y, w, process_group=wd))
    elif name == "different_options":
        _expect_error(ValueError, "keyword options", lambda: mmd(x, y, unbiased=(rank == 0), process_group=wd))
    elif name == "all_empty":
        _expect_error(ValueError, "empty on every rank", lambda: mmd(x[:0], y, process_group=wd))
    elif name == "not_a_group":
        _expect_error(TypeError, "ProcessGroup", lambda: mmd(x, y, process_group="world"))
    # one rank's fault: every rank raises at once (the faulty one its own error, the others naming it), none hangs
    elif name == "backend_unusable_on_one_rank":
        be = "cuda" if rank == 1 else "auto"  # CPU tensors: 'cuda' cannot run them
        pattern = "backend 'cuda' cannot run" if rank == 1 else "rank(s) [1] passed invalid input"
        _expect_error(
            RuntimeError if rank == 1 else ValueError, pattern, lambda: mmd(x, y, backend=be, process_group=wd)
        )
    elif name == "validate_on_some_ranks":
        _expect_error(ValueError, "validate", lambda: mmd(x, y, validate=(rank == 0), process_group=wd))
    elif name == "list_as_weights_on_one_rank":
        w = [1.0] * 4 if rank == 1 else torch.rand(4, dtype=torch.float64)
        pattern = "x_weights must be a torch.Tensor" if rank == 1 else "rank(s) [1] passed invalid input"
        _expect_error(TypeError if rank == 1 else ValueError, pattern, lambda: mmd(x, y, w, process_group=wd))
    elif name == "not_a_tensor_on_one_rank":
        xs = x.tolist() if rank == 1 else x
        pattern = "x must be a torch.Tensor" if rank == 1 else "rank(s) [1] passed invalid input"
        _expect_error(TypeError if rank == 1 else ValueError, pattern, lambda: mmd(xs, y, process_group=wd))
    # the group still works after the error on every rank: R copies of (x, y)
    _close("after the error", mmd(x, y, process_group=wd), mmd(x.repeat(world, 1), y.repeat(world, 1)), 1e-9)


def _check_ddp_rule(rank: int, world: int) -> None:
    """``loss_r = (n_r / N) * R * recon_r + lam * R * mmd``, gradients averaged over ranks (what DDP does), equals
    ``recon + lam * mmd`` on the global batch in one process; uneven shards."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, D), torch.nn.Tanh(), torch.nn.Linear(D, 5)).double()
    single = torch.nn.Sequential(torch.nn.Linear(5, D), torch.nn.Tanh(), torch.nn.Linear(D, 5)).double()
    single.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(7)
    counts = [3 + 2 * r for r in range(world)]  # uneven, non-empty
    images = torch.randn(sum(counts), 5, generator=g, dtype=torch.float64)
    prior = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    lam, big_n = 3.0, sum(counts)
    x_r, y_r = _shard(images, counts, rank, 1), _shard(prior, counts, rank, 1)

    def loss(net, imgs, pri, pg, r_scale, n_scale):
        z = net[0](imgs)
        recon = ((net[2](net[1](z)) - imgs) ** 2).sum(1).mean()
        return n_scale * r_scale * recon + lam * r_scale * gmwae_fast.fast_imq_mmd(z, pri, process_group=pg)

    loss(model, x_r, y_r, dist.group.WORLD, world, counts[rank] / big_n).backward()
    for p in model.parameters():  # what DDP's reducer does: average the gradients over the ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    loss(single, images, prior, None, 1.0, 1.0).backward()
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        _close(f"parameter gradient {name}", p.grad, q.grad, 1e-9)


def _check_ddp_module(rank: int, world: int) -> None:
    """The same rule through DistributedDataParallel's own reducer, with IMQMMDLoss(process_group=...)."""
    torch.manual_seed(1)
    enc = torch.nn.Linear(5, D).double()
    ddp = torch.nn.parallel.DistributedDataParallel(enc)
    single = torch.nn.Linear(5, D).double()
    single.load_state_dict(enc.state_dict())
    g = torch.Generator().manual_seed(8)
    counts = [4] * world
    images = torch.randn(4 * world, 5, generator=g, dtype=torch.float64)
    prior = torch.randn(4 * world, D, generator=g, dtype=torch.float64)
    loss_fn = gmwae_fast.IMQMMDLoss(scales=gmwae_fast.WAE_SCALES, process_group=dist.group.WORLD)
    z = ddp(_shard(images, counts, rank, 1))
    (z.pow(2).sum(1).mean() + 2.0 * world * loss_fn(z, _shard(prior, counts, rank, 1))).backward()
    zs = single(images)
    (zs.pow(2).sum(1).mean() + 2.0 * gmwae_fast.IMQMMDLoss(scales=gmwae_fast.WAE_SCALES)(zs, prior)).backward()
    for p, q in zip(enc.parameters(), single.parameters()):
        _close("DDP parameter gradient", p.grad, q.grad, 1e-9)


def _check_double_backward(rank: int) -> None:
    """First-order only, like the fused single-process path: a second derivative is an error, never a zero."""
    x = torch.randn(3 + rank, D, dtype=torch.float64, requires_grad=True)
    for reduction in ("sum", "none"):
        v = gmwae_fast.fast_imq_mmd(
            x, torch.randn(4, D, dtype=torch.float64), reduction=reduction, process_group=dist.group.WORLD
        )
        (g,) = torch.autograd.grad(v.sum(), x, create_graph=True)
        _expect_error(RuntimeError, "double backward", lambda: g.pow(2).sum().backward())


def _check_extreme_weights(rank: int, world: int) -> None:
    """Float32 points with concentrated weights (one 1, the rest 1e-6: the unbiased denominator cancelled) and
    float64 weights of 1e-50 and 1e300 (0 and inf once rounded to float32): the single-process value and weight
    gradient, to the float32 contract."""
    g = torch.Generator().manual_seed(21)
    x, y = torch.randn(8 * world, D, generator=g), torch.randn(6 * world, D, generator=g) + 0.3
    conc = torch.full((8 * world,), 1e-6, dtype=torch.float64)
    conc[0] = 1.0
    rand = torch.rand(8 * world, generator=g, dtype=torch.float64) + 0.1
    for w in (conc, rand * 1e-50, rand * 1e300):
        wl = w[8 * rank : 8 * (rank + 1)].clone().requires_grad_(True)
        v = gmwae_fast.fast_imq_mmd(
            x[8 * rank : 8 * (rank + 1)], y[6 * rank : 6 * (rank + 1)], wl, process_group=dist.group.WORLD
        )
        (gw,) = torch.autograd.grad(v, wl)
        wr = (w / w.max()).clone().requires_grad_(True)  # the same relative masses, in a range float64 handles
        r = gmwae_fast.fast_imq_mmd(x.double(), y.double(), wr, backend="reference")
        (gr,) = torch.autograd.grad(r, wr)
        gr = gr[8 * rank : 8 * (rank + 1)] / w.max()  # d/dw = d/d(w / max) / max
        assert abs(v.item() - r.item()) <= 1e-5 * abs(r.item()), (w.max().item(), v.item(), r.item())
        assert torch.isfinite(gw).all(), gw
        _close("weight gradient", gw, gr, 1e-4)


def _check_contract_hostile(rank: int, world: int) -> None:
    """The accuracy contract (``tests/test_accuracy_contract.py``) across ranks: hostile inputs sharded unevenly
    (a tight cluster, a far point of small weight, weights spanning 1e-30..1e30 in float64, bandwidths 1e12 times
    the spread), every fused CPU backend, against the float64 brute force in complement form."""
    from test_accuracy_contract import exact

    g = torch.Generator().manual_seed(33)
    cases = [  # (dtype, spread, weights, far weight, bandwidth multiplier)
        (torch.float32, 1e-3, "random", 1e-3, 1.0),
        (torch.float64, 1.0, "span", None, 1.0),
        (torch.float64, 1e-2, "random", None, 1e12),
        (torch.float32, 1.0, "none", 1.0, 1.0),
    ]
    counts = [3 + 2 * r for r in range(world)]  # uneven shards
    n = sum(counts)
    for dtype, spread, weights, far, mult in cases:
        x = torch.randn(n, D, generator=g, dtype=torch.float64) * spread
        y = torch.randn(2 * n, D, generator=g, dtype=torch.float64) * spread + 0.1 * spread
        xw = None
        if weights == "random":
            xw = torch.rand(n, generator=g, dtype=torch.float64) + 0.05
        elif weights == "span":
            xw = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 60 - 30)
        if far is not None:
            x[0] = 1e3 * spread
            xw = torch.ones(n, dtype=torch.float64) if xw is None else xw
            xw[0] = far * float(xw.max())
        x, y = x.to(dtype), y.to(dtype)
        xw = None if xw is None else xw.to(dtype)
        bws = [c * mult * spread**2 for c in gmwae_fast.reference.bandwidths_for(D, gmwae_fast.WAE_SCALES)]
        ref, U, T, _ = exact(x, y, xw, None, bws, True)
        u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
        bound = 1e-5 * abs(ref) + 8.0 * (u * U + 2.0**-53 * T)
        lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
        for backend in ("cpu", "reference"):
            v = gmwae_fast.fast_imq_mmd(
                x[lo:hi],
                y[2 * lo : 2 * hi],
                None if xw is None else xw[lo:hi],
                bandwidths=bws,
                backend=backend,
                process_group=dist.group.WORLD,
            )
            assert abs(v.item() - ref) <= bound, (backend, dtype, spread, weights, v.item(), ref, bound)


def _run_case(case_id: str, eq: dict, rank: int, world: int) -> str:
    try:
        if case_id in eq:
            _check_equivalence(eq[case_id], list(eq).index(case_id), rank, world)
        elif case_id in ERROR_CASES:
            _check_error(case_id, rank, world)
        elif case_id == "ddp_rule":
            _check_ddp_rule(rank, world)
        elif case_id == "imqmmdloss_module":
            _check_ddp_module(rank, world)
        elif case_id == "double_backward_raises":
            _check_double_backward(rank)
        elif case_id == "extreme_weights":
            _check_extreme_weights(rank, world)
        elif case_id == "contract_hostile":
            _check_contract_hostile(rank, world)
        return ""
    except Exception:  # recorded, reported by the parent's pytest item
        return traceback.format_exc(limit=6)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    eq = {c["id"]: c for c in _equivalence_cases(world)}
    results = {cid: _run_case(cid, eq, rank, world) for cid in _case_ids(world) if cid != "destroyed_group"}
    group = dist.group.WORLD
    dist.destroy_process_group()
    try:
        _expect_error(
            RuntimeError,
            "not initialised",
            lambda: gmwae_fast.fast_imq_mmd(torch.randn(4, D), torch.randn(4, D), process_group=group),
        )
        results["destroyed_group"] = ""
    except Exception:
        results["destroyed_group"] = traceback.format_exc(limit=6)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS: dict = {}


def _results(world: int) -> list[dict]:
    if world not in _RESULTS:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
            _RESULTS[world] = []
            for r in range(world):
                with open(os.path.join(out, f"rank{r}.json")) as f:
                    _RESULTS[world].append(json.load(f))
    return _RESULTS[world]


# ---------------------------------------------------------------------------------------------------------------
# pytest items
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,case_id", [(w, c) for w in (2, 3) for c in _case_ids(w)])
def test_distributed_case(world: int, case_id: str) -> None:
    if "triton" in case_id:
        reason = gmwae_fast.available_backends("cpu")["triton"]
        if reason is not None:
            pytest.skip(f"triton unusable on CPU here: {reason}")
    results = _results(world)
    failures = [f"rank {r}:\n{res[case_id]}" for r, res in enumerate(results) if res.get(case_id, "missing")]
    assert not failures, "\n".join(failures)


def test_uninitialised_process_group_is_an_error() -> None:
    assert not dist.is_initialized()
    x = torch.randn(4, D)
    with pytest.raises(RuntimeError, match="not initialised"):
        gmwae_fast.fast_imq_mmd(x, x + 1, process_group=object())
    with pytest.raises(RuntimeError, match="not initialised"):
        gmwae_fast.IMQMMDLoss(process_group=object())(x, x + 1)
