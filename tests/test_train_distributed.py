"""Data-parallel training (``torchrun -m gmwae_fast.train``): 2 ranks on gloo over 127.0.0.1 against one process,
a killed rank, and the pieces (shards, gradient composition, options). CPU only, tiny networks, fake MNIST.

The 2-rank runs are real processes (one per rank, with the environment torchrun sets; the resume goes through
``python -m torch.distributed.run``). On CPU each rank normalises its own shard in batch norm, so the single-process
side runs with ``--bn-shards 2``: the same two shards (6 and 5 of an 11-image batch: uneven on purpose).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gmwae_fast.train import checkpoint as ck
from gmwae_fast.train.cli import main
from gmwae_fast.train.config import prior_and_model
from gmwae_fast.train.data import MNIST_FILES
from gmwae_fast.train.dist import EXIT_PEER_FAILED, Shards, rank_objective, split_bounds

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
ARGS = [
    "--batch-size",
    "11",
    "--modes",
    "4",
    "--enc-channels",
    "4",
    "--dec-channels",
    "4",
    "--hidden",
    "4",
    "--pretrain-steps",
    "2",
    "--log-every",
    "1",
    "--eval-every",
    "10",
    "--ckpt-every",
    "5",
    "--eval-recon",
    "8",
    "--no-kmeans",
    "--no-figures",
    "--threads",
    "1",
    "--no-download",
    "--no-progress",
    "--steps",
    str(STEPS),
    "--consistency",
    "1",
    "--balance",
    "1",
    "--seed",
    "2",
    "--dist-timeout",
    "30",
    "--ema",
    "0.9",
]
LAUNCH_TIMEOUT = 420  # seconds for a whole 2-rank run (process start-up dominates on a busy 2-core VM)
#: Biases that feed a batch norm: their exact gradient is 0 (the norm removes any shift), so Adam turns the
#: rounding noise in it into steps of about lr either way; they, and the running means that follow them, do not
#: change what the networks compute in training mode and are checked through the networks' outputs instead.
GAUGE = (
    "encoder.trunk.0.bias",
    "encoder.trunk.3.bias",
    "encoder.trunk.6.bias",
    "encoder.b1",
    "encoder.b2",
    "decoder.fc.0.bias",
    "decoder.net.0.bias",
    "decoder.net.3.bias",
)


def _fake_mnist(root: Path, n_train=96, n_test=24) -> Path:
    rs = np.random.RandomState(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = [
        (rs.randint(0, 256, (n_train, 28, 28)), 2051),
        (np.arange(n_train) % 10, 2049),
        (rs.randint(0, 256, (n_test, 28, 28)), 2051),
        (np.arange(n_test) % 10, 2049),
    ]
    for name, (arr, magic) in zip(MNIST_FILES, arrays):
        (raw / name).write_bytes(struct.pack(f">{1 + arr.ndim}i", magic, *arr.shape) + arr.astype(np.uint8).tobytes())
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _spawn_ranks(argv, logs: Path, world=2):
    """One process per rank with torchrun's environment; returns the Popen objects."""
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = _env(MASTER_PORT=port, WORLD_SIZE=str(world), RANK=str(r), LOCAL_RANK=str(r))
        with open(logs / f"rank{r}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gmwae_fast.train", *argv],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _wait_all(procs, logs: Path, timeout=LAUNCH_TIMEOUT):
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a 2-rank run did not finish in {timeout} s; logs: {_logs(logs)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(logs.glob("*.log")))


def _train_records(out: Path):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _state(out: Path):
    return ck.load_checkpoint(out / "checkpoints" / ck.CKPT_NAME)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _fake_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """An uninterrupted 2-rank run: its output directory."""
    base = tmp_path_factory.mktemp("ddp")
    out = base / "out"
    rcs = _wait_all(_spawn_ranks(["--data-dir", str(data), "--out", str(out), *ARGS], base), base)
    assert rcs == [0, 0], _logs(base)
    return out


def _single(data, out: Path, *extra) -> Path:
    assert main(["--data-dir", str(data), "--out", str(out), *ARGS, *extra]) == 0
    return out


# ------------------------------------------------------------------------------------------------ pieces
@pytest.mark.parametrize("total,parts", [(11, 2), (10, 3), (7, 7), (100, 8)])
def test_split_bounds_cover_the_batch(total, parts):
    b = split_bounds(total, parts)
    assert b[0][0] == 0 and b[-1][1] == total and all(hi == lo2 for (_, hi), (lo2, _) in zip(b, b[1:]))
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        split_bounds(5, 0)


def test_shards_of_ranks_and_virtual_shards_agree():
    one = Shards.single(11, 2)
    ranks = [Shards.of_rank(11, 2, r, None) for r in range(2)]
    assert one.bounds == tuple(s.bounds[0] for s in ranks) == ((0, 6), (6, 11))
    assert one.weights() == pytest.approx([6 / 11, 5 / 11]) and ranks[1].weights() == pytest.approx([5 / 11])
    t = torch.arange(22.0)
    assert torch.equal(ranks[1].rows_of(t), t[11:]) and torch.equal(one.rows_of(t), t)
    assert Shards.single(11).whole and not one.whole and one.virtual


def test_rank_objective_composes_with_ddp_averaging():
    """Two ranks' ``R * (share + global)`` gradients, averaged as DDP does, equal the one-process gradient of
    ``mean + global`` on the whole batch (float64, uneven shards)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(11, 3, dtype=torch.float64, generator=g)

    def glob(rows):  # a "global" term: a function of every row, gradient through `rows`
        return torch.logsumexp(rows @ theta, 0)

    ref = torch.autograd.grad(rank_objective([(2.0, (x @ theta).pow(2).mean()), (3.0, glob(x))], 1), theta)[0]
    grads = []
    for lo, hi in split_bounds(11, 2):
        mine = x[lo:hi] @ theta
        rows = torch.cat([(x[:lo] @ theta).detach(), mine, (x[hi:] @ theta).detach()])
        share = (hi - lo) / 11 * mine.pow(2).mean()
        grads.append(torch.autograd.grad(rank_objective([(2.0, share), (3.0, torch.logsumexp(rows, 0))], 2), theta)[0])
    torch.testing.assert_close(sum(grads) / 2, ref, rtol=1e-12, atol=1e-12)


def test_bn_shards_and_world_size_options(data, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data-dir", str(data), "--out", str(tmp_path / "o"), *ARGS, "--bn-shards", "6"])
    assert e.value.code == 2 and "fewer than 2 images" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["--data-dir", str(data), "--out", str(tmp_path / "o"), *ARGS, "--bn-shards", "2"])
    assert e.value.code == 2 and "--bn-shards is for one process" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SystemExit):
        main(["--data-dir", str(data), "--out", str(tmp_path / "o"), *ARGS])
    assert "WORLD_SIZE must be an integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 2 ranks
def _train_mode_outputs(state, x):
    """The networks of a checkpoint in training mode (batch statistics) on ``x``: independent of GAUGE."""
    _, model = prior_and_model(state["config"])
    model.load_state_dict(state["model"])
    model.train()
    with torch.no_grad():
        mu, sigma_raw, logits = model.encoder(x)
        return mu, sigma_raw, logits, model.decode(mu[:, 0])


def test_two_ranks_match_one_process_on_the_same_global_batch(two_ranks, data, tmp_path):
    """Loss terms per step and final networks of the 2-rank run against one process with the same batch-norm
    shards. Tolerances: the two sides add the same float32 numbers in other orders (gradient all-reduce, shard
    sums), so they agree to rounding: logged values to 1e-5 relative (measured: 3e-7) or 1e-6 absolute for the
    near-zero MMD / regularisers (measured: 1e-7); parameters to 2e-4 (measured: 4e-5; Adam divides small
    gradients by their own scale, which magnifies rounding); the networks' training-mode outputs to 1e-3 of their
    largest value (measured: 3e-5 for the decoder, which compounds its layers' differences, 4e-7 for the encoder).
    The same run with batch norm over the whole batch (one process, no --bn-shards) is the control: it is off by
    1e-3 to 1 on the logged numbers and by about 1e-1 of the scale on the decoder's output."""
    single = _single(data, tmp_path / "single", "--bn-shards", "2")
    control = _single(data, tmp_path / "control")
    a, b, c = _train_records(two_ranks), _train_records(single), _train_records(control)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "recon"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=0), (ra["step"], key)
        for key in ("mmd", "consistency", "balance"):
            assert ra[key] == pytest.approx(rb[key], rel=0, abs=1e-6), (ra["step"], key)
        assert ra["batch_active_modes"] == rb["batch_active_modes"]
    assert max(abs(ra["loss"] - rc["loss"]) / abs(ra["loss"]) for ra, rc in zip(a, c)) > 1e-3
    sa, sb = _state(two_ranks), _state(single)
    assert sa["step"] == sb["step"] == STEPS and sa["world_size"] == 2 and sb["world_size"] == 1
    assert sa["ema"]["updates"] == sb["ema"]["updates"] == STEPS  # rank 0 keeps the weight average (--ema)
    for key, ta, tb in (("model", sa["model"], sb["model"]), ("ema", sa["ema"]["model"], sb["ema"]["model"])):
        for name, t in ta.items():
            if t.is_floating_point() and name not in GAUGE and not name.endswith("running_mean"):
                torch.testing.assert_close(t, tb[name], rtol=0, atol=2e-4, msg=f"{key}: {name}")
    x = torch.rand(11, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for name, oa, ob, oc in zip(
        ("mu", "sigma_raw", "logits", "decoder"),
        _train_mode_outputs(sa, x),
        _train_mode_outputs(sb, x),
        _train_mode_outputs(_state(control), x),
    ):
        scale = float(oa.abs().max())
        assert float((oa - ob).abs().max()) <= 1e-3 * scale, name
        assert float((oa - oc).abs().max()) > 1e-3 * scale, name  # the control is told apart
    summary = json.loads((two_ranks / "summary.json").read_text())
    assert (summary["world_size"], summary["dist_backend"], summary["batch_norm"]) == (2, "gloo", "per-rank")
    assert json.loads((single / "summary.json").read_text())["batch_norm"] == "per-shard"


def test_killed_rank_ends_the_other_and_resume_finishes(two_ranks, data, tmp_path):
    """Rank 1 SIGKILLs itself after step 13: rank 0 exits with status 4 and a clear message well within
    --dist-timeout; the step-10 checkpoint is intact; a torchrun --resume finishes the run bit for bit like the
    uninterrupted one."""
    out = tmp_path / "out"
    argv = ["--data-dir", str(data), "--out", str(out), *ARGS]
    procs = _spawn_ranks([*argv, "--debug-kill-at-step", "1:13"], tmp_path)
    try:
        assert procs[1].wait(timeout=LAUNCH_TIMEOUT) == -signal.SIGKILL, _logs(tmp_path)
        died = time.monotonic()
        rc0 = procs[0].wait(timeout=60)
    finally:
        _wait_all(procs, tmp_path, timeout=1)
    assert rc0 == EXIT_PEER_FAILED and time.monotonic() - died < 30, _logs(tmp_path)
    err = (tmp_path / "rank0.log").read_text()
    assert "rank 0 of 2: a collective operation failed" in err and "Traceback" not in err
    state = _state(out)  # sha256 verified
    assert state["step"] == 10 and not ck.stale_temporaries(out / "checkpoints" / ck.CKPT_NAME)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "gmwae_fast.train",
        *argv,
        "--resume",
    ]
    res = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _state(two_ranks), _state(out)
    assert a["step"] == b["step"] == STEPS
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        assert torch.equal(a["ema"]["model"][name], b["ema"]["model"][name]), name
    assert (two_ranks / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


def test_resume_with_another_world_size_is_refused(two_ranks, data, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(two_ranks, out)
    rc = main(["--data-dir", str(data), "--out", str(out), *ARGS, "--resume", "--steps", str(STEPS + 2)])
    assert rc == 2 and "2 rank(s) in the checkpoint, 1 now" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_rank_0_failing_before_training_stops_every_rank_with_its_message(two_ranks, data, tmp_path):
    """A corrupt checkpoint on --resume: rank 0 finds it, every rank exits 2 with rank 0's one-line reason."""
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(two_ranks, out)
    path = out / "checkpoints" / ck.CKPT_NAME
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))
    argv = ["--data-dir", str(data), "--out", str(out), *ARGS, "--resume", "--steps", str(STEPS + 2)]
    assert _wait_all(_spawn_ranks(argv, tmp_path), tmp_path) == [2, 2], _logs(tmp_path)
    for r in range(2):
        err = (tmp_path / f"rank{r}.log").read_text()
        assert f"error: rank {r} of 2: " in err and "sha256 does not match" in err and "Traceback" not in err
    assert "rank 0 stopped" in (tmp_path / "rank1.log").read_text()
