"""Hostile inputs to the trainer: bad data files, bad checkpoints, resume with other options, impossible options,
unwritable outputs, a full disk, killed checkpoint writes; plus the progress output and ``--recipe``.

The runs train on small fake IDX files written into tmp dirs (random pixels, labels 0..9), so they need no MNIST
and take about a second each.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmwae_fast.train import checkpoint as ck
from gmwae_fast.train import trainer
from gmwae_fast.train.cli import EXIT_DIVERGED, build_parser, explicit_options, main
from gmwae_fast.train.config import TrainConfig, apply_recipe, prior_and_model
from gmwae_fast.train.data import MNIST_FILES, InvalidDataError, load_mnist
from gmwae_fast.train.progress import make_progress


# ------------------------------------------------------------------------------------------------ fake MNIST
def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">{1 + arr.ndim}i", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def fake_mnist(root: Path, n_train=64, n_test=24, gz=False, seed=0, edit=None) -> Path:
    """Writes the four IDX files under root/MNIST/raw; ``edit(name, bytes) -> bytes`` may spoil one."""
    rs = np.random.RandomState(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {
        MNIST_FILES[0]: (rs.randint(0, 256, (n_train, 28, 28)), 2051),
        MNIST_FILES[1]: (np.arange(n_train) % 10, 2049),
        MNIST_FILES[2]: (rs.randint(0, 256, (n_test, 28, 28)), 2051),
        MNIST_FILES[3]: (np.arange(n_test) % 10, 2049),
    }
    for name, (arr, magic) in arrays.items():
        data = _idx_bytes(arr, magic)
        if edit is not None:
            data = edit(name, data)
        if gz:
            (raw / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    return root


@pytest.fixture
def data(tmp_path):
    return fake_mnist(tmp_path / "data")


SMALL = [
    "--batch-size",
    "8",
    "--enc-channels",
    "4",
    "--dec-channels",
    "4",
    "--hidden",
    "4",
    "--pretrain-steps",
    "1",
    "--log-every",
    "1",
    "--eval-every",
    "2",
    "--eval-recon",
    "8",
    "--no-kmeans",
    "--no-figures",
    "--threads",
    "1",
    "--mmd-backend",
    "reference",
    "--reparam-backend",
    "reference",
    "--no-download",
]


def _args(data, out, *extra, progress=False):
    return ["--data-dir", str(data), "--out", str(out), *SMALL, *extra] + ([] if progress else ["--no-progress"])


def run(data, out, *extra, progress=False):
    return main(_args(data, out, *extra, progress=progress))


def one_error_line(err: str) -> str:
    """The single ``error:`` line of a failed run (and no traceback)."""
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    return lines[0]


def ckpt(out: Path) -> Path:
    return out / "checkpoints" / ck.CKPT_NAME


# ------------------------------------------------------------------------------------------------ data (item 14)
def test_fake_idx_loads_plain_and_gz_only(tmp_path):
    a = load_mnist(str(fake_mnist(tmp_path / "plain", n_train=30, n_test=12)), download=False)
    b = load_mnist(str(fake_mnist(tmp_path / "gz", n_train=30, n_test=12, gz=True)), download=False)
    assert not any((tmp_path / "gz" / "MNIST" / "raw" / f).exists() for f in MNIST_FILES)
    assert [t.shape for t in a] == [(30, 1, 28, 28), (30,), (12, 1, 28, 28), (12,)]
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert a[0].dtype == torch.float32 and 0 <= float(a[0].min()) and float(a[0].max()) <= 1
    assert a[1].tolist() == [i % 10 for i in range(30)] and a[1].dtype == torch.int64


def _spoil(target, how):
    def edit(name, data):
        return how(data) if name == target else data

    return edit


@pytest.mark.parametrize(
    "target,how,words",
    [
        (MNIST_FILES[0], lambda d: d[:-100], ["truncated", MNIST_FILES[0]]),
        (MNIST_FILES[2], lambda d: d + b"\0" * 7, ["oversized", MNIST_FILES[2]]),
        (MNIST_FILES[1], lambda d: d[:5], ["truncated", "header"]),
        (MNIST_FILES[3], lambda d: b"\x00\x00\x08\x03" + d[4:], ["magic number 2051", "expected 2049"]),
        (MNIST_FILES[0], lambda d: b"garbage!" * 10, ["magic number"]),
        (MNIST_FILES[3], lambda d: d[:-1] + bytes([200]), ["label 200", "0..9"]),
        (MNIST_FILES[2], lambda d: d[:8] + struct.pack(">ii", 32, 24) + d[16:], ["32x24", "28x28"]),
    ],
    ids=["truncated", "oversized", "header", "magic-swapped", "garbled", "label-200", "image-size"],
)
def test_bad_idx_files_are_named(tmp_path, capsys, target, how, words):
    root = fake_mnist(tmp_path / "d", edit=_spoil(target, how))
    with pytest.raises(InvalidDataError) as e:
        load_mnist(str(root), download=False)
    for w in words:
        assert w in str(e.value)
    assert main(_args(root, tmp_path / "o")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "could not be downloaded" not in line and all(w in line for w in words)


def test_count_mismatch_between_images_and_labels(tmp_path, capsys):
    """The issue's case of 5000 test images with 10000 labels, in small."""
    root = fake_mnist(tmp_path / "d", n_test=20)
    (root / "MNIST" / "raw" / MNIST_FILES[3]).write_bytes(_idx_bytes(np.arange(40) % 10, 2049))
    assert main(_args(root, tmp_path / "o", "--steps", "2")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "20 images" in line and "40 labels" in line and MNIST_FILES[3] in line
    assert not ckpt(tmp_path / "o").exists()  # refused before any training


def test_corrupt_gz_is_named(tmp_path):
    root = fake_mnist(tmp_path / "d", gz=True)
    p = root / "MNIST" / "raw" / (MNIST_FILES[1] + ".gz")
    p.write_bytes(p.read_bytes()[:30])
    with pytest.raises(InvalidDataError, match="cannot be read"):
        load_mnist(str(root), download=False)


# ------------------------------------------------------------------------------------------------ checkpoints (12, 15)
def _state():
    return {"model": {"w": torch.arange(6.0)}, "step": 3}


def _flip(data: bytes) -> bytes:
    i = len(data) - 200
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]


@pytest.mark.parametrize(
    "spoil,words",
    [
        (_flip, "sha256"),
        (lambda d: d[: len(d) // 2], "sha256"),
        (lambda d: d[:40], "truncated"),
        (lambda d: b"", "empty"),
        (lambda d: b"hello, world\n" * 9, "not a gmwae_fast checkpoint"),
    ],
    ids=["flipped", "truncated-payload", "truncated-header", "empty", "foreign"],
)
def test_bad_checkpoint_is_one_clear_error(tmp_path, spoil, words):
    p = tmp_path / "last.pt"
    ck.atomic_save(_state(), p)
    assert ck.load_checkpoint(p)["step"] == 3
    p.write_bytes(spoil(p.read_bytes()))
    with pytest.raises(ck.CheckpointError, match=words):
        ck.load_checkpoint(p)


def test_checkpoint_with_nan_weight_is_refused(tmp_path):
    p = tmp_path / "last.pt"
    st = _state()
    st["model"]["w"][2] = float("nan")
    ck.atomic_save(st, p)  # a valid digest: only the finiteness check can catch it
    with pytest.raises(ck.CheckpointError, match=r"non-finite values in model\.w"):
        ck.load_checkpoint(p)


def test_plain_torch_save_checkpoints_still_load(tmp_path):
    p = tmp_path / "old.pt"
    torch.save(_state(), p)
    assert torch.equal(ck.load_checkpoint(p)["model"]["w"], torch.arange(6.0))
    torch.save([1, 2], p)
    with pytest.raises(ck.CheckpointError, match="not a gmwae_fast checkpoint"):
        ck.load_checkpoint(p)


def test_stale_temporaries_are_found_and_removed(tmp_path):
    p = tmp_path / "last.pt"
    ck.atomic_save(_state(), p)
    stale = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".last.pt.x.tmp"]
    keep = [tmp_path / "other.tmp", tmp_path / ".other.pt.x.tmp", tmp_path / "last.pt.tmp"]
    for f in stale + keep:
        f.write_bytes(b"x" * 1000)
    assert ck.stale_temporaries(p) == sorted(stale)
    assert ck.remove_stale_temporaries(p) == 2
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(["last.pt"] + [f.name for f in keep])


# ------------------------------------------------------------------------------------------------ CLI: resume (11)
def test_resume_with_other_options_is_refused(data, tmp_path, capsys):
    out = tmp_path / "r"
    assert run(data, out, "--steps", "3") == 0
    before = ckpt(out).read_bytes()
    rc = run(
        data,
        out,
        "--steps",
        "3",
        "--resume",
        "--seed",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--prior-samples",
        "20",
    )
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    for w in (
        "--seed 0 in the checkpoint, 1 now",
        "--batch-size 8 in the checkpoint, 16 now",
        "--lr 0.0005 in the checkpoint, 0.001 now",
        "--prior-samples None in the checkpoint, 20 now",
        "--allow-config-change",
    ):
        assert w in line
    assert ckpt(out).read_bytes() == before


def test_resume_may_extend_steps_and_change_cadence(data, tmp_path):
    out = tmp_path / "r"
    assert run(data, out, "--steps", "3") == 0
    assert (
        run(data, out, "--steps", "5", "--resume", "--eval-every", "5", "--threads", "2", "--lr-decay-from", "3") == 0
    )
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in recs if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 3
    assert resume[0]["config_changes"] == {
        "steps": [3, 5],
        "eval_every": [2, 5],
        "threads": [1, 2],
        "lr_decay_from": [None, 3],
    }
    assert resume[0]["allowed_by_allow_config_change"] == []
    assert ck.load_checkpoint(ckpt(out))["step"] == 5


def test_allow_config_change_is_recorded(data, tmp_path):
    out = tmp_path / "r"
    assert run(data, out, "--steps", "2") == 0
    assert (
        run(data, out, "--steps", "4", "--resume", "--lr", "1e-3", "--adam-beta1", "0.9", "--allow-config-change") == 0
    )
    resume = [
        json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if json.loads(l)["kind"] == "resume"
    ]
    assert resume[0]["allowed_by_allow_config_change"] == ["adam_beta1", "lr"]
    st = ck.load_checkpoint(ckpt(out))
    assert st["config"]["lr"] == 1e-3
    assert all(g["betas"] == (0.9, 0.999) and g["lr"] == 1e-3 for g in st["optimizer"]["param_groups"])
    train = [
        json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if json.loads(l)["kind"] == "train"
    ]
    assert [r["lr"] for r in train] == [5e-4, 5e-4, 1e-3, 1e-3]


def test_other_network_sizes_name_the_option(data, tmp_path, capsys):
    out = tmp_path / "r"
    assert run(data, out, "--steps", "2") == 0
    assert run(data, out, "--steps", "2", "--resume", "--dec-channels", "8", "--allow-config-change") == 2
    assert "--dec-channels 4 in the checkpoint, 8 now" in one_error_line(capsys.readouterr().err)
    rc = run(
        data,
        tmp_path / "i",
        "--steps",
        "2",
        "--init-from",
        str(ckpt(out)),
        "--hidden",
        "6",
        "--modes",
        "9",
        "--latent-dim",
        "10",
    )
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--init-from" in line and "--hidden 4 in the checkpoint, 6 now" in line and "--modes 10" in line


def test_init_from_a_raw_state_dict_of_other_shapes(data, tmp_path, capsys):
    p = tmp_path / "raw.pt"
    _, model = prior_and_model(vars(build_parser().parse_args(["--hidden", "5"])))
    torch.save(model.state_dict(), p)
    assert run(data, tmp_path / "i", "--steps", "2", "--init-from", str(p)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "do not fit this network" in line and "size mismatch" in line


@pytest.mark.parametrize(
    "spoil,words",
    [
        (_flip, "sha256"),
        (lambda d: d[:1000], "sha256"),
        (lambda d: b"", "empty"),
        (lambda d: b"\x89PNG\r\n" + d[:300], "not a gmwae_fast checkpoint"),
    ],
    ids=["flipped", "truncated", "empty", "foreign"],
)
def test_resume_from_a_bad_checkpoint(data, tmp_path, capsys, spoil, words):
    out = tmp_path / "r"
    assert run(data, out, "--steps", "2") == 0
    ckpt(out).write_bytes(spoil(ckpt(out).read_bytes()))
    assert run(data, out, "--steps", "4", "--resume") == 2
    assert words in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ non-finite (12)
def test_nonfinite_weights_are_never_checkpointed(data, tmp_path, capsys):
    out = tmp_path / "n"
    rc = run(data, out, "--steps", "8", "--ckpt-every", "2", "--eval-every", "100", "--debug-nan-weight-at-step", "4")
    assert rc == EXIT_DIVERGED
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite values in model." in line and "after step 4" in line
    assert "last good checkpoint" in line and "(step 2)" in line
    assert ck.load_checkpoint(ckpt(out))["step"] == 2
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "diverged" and last["step"] == 4


def test_nonfinite_weights_between_checkpoints_stop_at_the_loss(data, tmp_path, capsys):
    out = tmp_path / "n"
    rc = run(data, out, "--steps", "8", "--ckpt-every", "4", "--eval-every", "100", "--debug-nan-weight-at-step", "2")
    assert rc == EXIT_DIVERGED
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite loss" in line and "step 3" in line and "(step 0)" in line
    assert ck.load_checkpoint(ckpt(out))["step"] == 0


# ------------------------------------------------------------------------------------------------ options (13)
@pytest.mark.parametrize(
    "bad,words",
    [
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--prior-samples", "1"], "--prior-samples must be at least 2"),
        (["--test-subset", "1"], "--test-subset must be at least 2"),
    ],
)
def test_degenerate_sizes_are_argparse_errors(data, tmp_path, capsys, bad, words):
    with pytest.raises(SystemExit) as e:
        run(data, tmp_path / "o", *bad)
    assert e.value.code == 2
    assert words in one_error_line(capsys.readouterr().err)


def test_batch_larger_than_the_training_set(data, tmp_path, capsys):
    assert run(data, tmp_path / "o", "--batch-size", "100000") == 2
    assert "--batch-size 100000 exceeds the number of training images (64)" in one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA; this machine has CUDA")
@pytest.mark.parametrize("opt", ["--reparam-backend", "--mmd-backend"])
def test_cuda_backend_without_cuda(data, tmp_path, capsys, opt):
    assert run(data, tmp_path / "o", opt, "cuda", "--device", "cpu") == 2
    assert f"{opt} cuda" in one_error_line(capsys.readouterr().err)


def test_out_is_a_file_or_under_a_file(data, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run(data, f) == 2
    assert "is not a directory" in one_error_line(capsys.readouterr().err)
    assert run(data, f / "sub") == 2
    assert "not a writable directory" in one_error_line(capsys.readouterr().err)
    assert f.read_text() == "x"


def test_out_not_writable(data, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    (ro / "checkpoints").mkdir(parents=True)
    if os.geteuid() != 0:
        os.chmod(ro / "checkpoints", 0o555)
    else:  # root writes anywhere: refuse the write probe as a read-only mount would

        def refuse(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(trainer.tempfile, "TemporaryFile", refuse)
    try:
        assert run(data, ro) == 2
    finally:
        os.chmod(ro / "checkpoints", 0o755)
    line = one_error_line(capsys.readouterr().err)
    assert "not a writable directory" in line


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "full"
    real_fdopen = ck.os.fdopen
    calls = []

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(bytes(b[:100]))  # part of it, as a real full disk would
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
            super().close()

    def fdopen(fd, mode="r", *a, **k):
        calls.append(fd)
        f = real_fdopen(fd, mode, *a, **k)
        return Full(f) if len(calls) >= 3 else f  # saves: step 0, step 2, then the disk is full

    monkeypatch.setattr(ck.os, "fdopen", fdopen)
    assert run(data, out, "--steps", "6", "--ckpt-every", "2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "at step 4" in line and "step 2 is kept" in line
    monkeypatch.setattr(ck.os, "fdopen", real_fdopen)
    assert ck.load_checkpoint(ckpt(out))["step"] == 2
    assert ck.stale_temporaries(ckpt(out)) == []
    assert run(data, out, "--steps", "6", "--ckpt-every", "2", "--resume") == 0


def test_stale_temporaries_are_cleaned_at_start_and_on_resume(data, tmp_path, capsys):
    out = tmp_path / "s"
    stale = out / "checkpoints" / ".last.pt.k1ll3d.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 4096)
    assert run(data, out, "--steps", "2") == 0
    assert not stale.exists()
    stale.write_bytes(b"\0" * 4096)
    assert run(data, out, "--steps", "3", "--resume") == 0
    assert not stale.exists() and "removed 1 temporary file" in capsys.readouterr().err
    assert sorted(p.name for p in stale.parent.iterdir()) == ["last.pt"]


# ------------------------------------------------------------------------------------------------ progress (17)
def test_progress_lines_without_a_terminal(data, tmp_path, capsys):
    assert run(data, tmp_path / "p", "--steps", "4", "--progress-seconds", "0", progress=True) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("gmwae step ")]
    assert [l.split(":")[0] for l in lines] == [f"gmwae step {i}/4" for i in (1, 2, 3, 4)]
    assert "loss " in lines[0] and "test accuracy" not in lines[0]
    assert "test accuracy" in lines[1] and "active modes" in lines[1] and "(step 2)" in lines[1]
    assert "\r" not in err and "it/s" not in err  # no tqdm bar
    assert run(data, tmp_path / "q", "--steps", "4", "--progress-seconds", "1000", progress=True) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("gmwae step ")]
    assert [l.split(":")[0] for l in lines] == ["gmwae step 1/4", "gmwae step 4/4"]
    assert run(data, tmp_path / "r", "--steps", "2") == 0  # --no-progress: silent
    assert "step" not in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal():
    a = TrainConfig.from_args(build_parser().parse_args(["--steps", "3"]))
    s = _Tty()
    prog = make_progress(a, 0, s)
    for i in (1, 2, 3):
        prog.update(i, 1.5, {"test_accuracy": 0.25, "active_modes": 7, "step": 2} if i > 1 else None)
    prog.close()
    text = s.getvalue()
    assert "3/3" in text and "acc=0.250" in text and "modes=7" in text and "\r" in text
    assert make_progress(TrainConfig.from_args(build_parser().parse_args(["--no-progress"])), 0, s) is None
    assert type(make_progress(a, 0, io.StringIO())).__name__ == "_LineProgress"


# ------------------------------------------------------------------------------------------------ recipe (17)
def _resolved(argv):
    return apply_recipe(TrainConfig.from_args(build_parser().parse_args(argv)), explicit_options(argv))


def test_recipe_paper_changes_nothing_and_robust_bundles():
    assert vars(_resolved([])) == vars(build_parser().parse_args([]))
    assert vars(_resolved(["--recipe", "paper"])) == vars(build_parser().parse_args(["--recipe", "paper"]))
    r = _resolved(["--recipe", "robust", "--steps", "1000"])
    assert (r.consistency, r.balance, r.mode_prune, r.lr_decay_from, r.lr_final) == (50.0, 100.0, 1e-4, 750, 0.0)
    assert r.lam == 500.0 and r.lr == 5e-4
    e = _resolved(["--recipe", "robust-ema", "--steps", "1000"])
    assert (e.consistency, e.balance, e.mode_prune, e.lr_decay_from, e.ema) == (50.0, 100.0, 1e-4, None, 0.999)
    assert r.ema == 0.0 and e.lr == 5e-4
    assert (r.recon_scale, e.recon_scale) == (1.0, 2.0)


def test_recipe_explicit_options_win():
    r = _resolved(
        [
            "--recipe",
            "robust",
            "--steps",
            "100",
            "--consistency",
            "0",
            "--lr-decay-from",
            "10",
            "--mode-prune=0.01",
            "--balance",
            "100",
        ]
    )
    assert (r.consistency, r.lr_decay_from, r.mode_prune, r.balance) == (0.0, 10, 0.01, 100.0)
    assert explicit_options(["--steps", "5", "--no-kmeans"]) == {"steps", "no_kmeans"}


def test_recipe_in_help_and_recorded(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "robust" in help_text and "--consistency 50 --balance 100" in help_text
    assert not re.search(r"\d\s*(min|h|s)\b|about \d|results/", help_text)  # no run stories or timings
    out = tmp_path / "rob"
    assert run(data, out, "--recipe", "robust", "--steps", "8", "--eval-every", "8", "--balance", "3") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["recipe"] == "robust" and s["config"]["recipe"] == "robust"
    c = s["config"]
    assert (c["consistency"], c["balance"], c["mode_prune"], c["lr_decay_from"], c["lr_final"]) == (
        50.0,
        3.0,
        1e-4,
        6,
        0.0,
    )
    train = [
        json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if json.loads(l)["kind"] == "train"
    ]
    assert all("consistency" in r and "balance" in r and "decoded_modes" in r for r in train)
    assert train[-1]["lr"] < train[0]["lr"]


def test_file_size_limit_in_a_real_process(data, tmp_path):
    """A real write failure (EFBIG under RLIMIT_FSIZE, as a full disk gives ENOSPC) in a separate process: one
    error line, exit 2, the previous checkpoint intact."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "fs"
    assert run(data, out, "--steps", "2") == 0
    size = ckpt(out).stat().st_size
    before = ckpt(out).read_bytes()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    p = subprocess.run(
        [sys.executable, "-m", "gmwae_fast.train", *_args(data, out, "--steps", "4", "--resume")],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert "could not write the checkpoint" in line and "File too large" in line and "step 2 is kept" in line
    assert ckpt(out).read_bytes() == before and ck.stale_temporaries(ckpt(out)) == []


def test_download_path(tmp_path, monkeypatch):
    """Absent files go through torchvision's MNIST(download=True), which leaves uncompressed IDX files in raw/."""
    import torchvision.datasets

    calls = []

    def fake_download(root, train, download):
        calls.append((train, download))
        fake_mnist(Path(root), n_train=20, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_download)
    x, y, xt, yt = load_mnist(str(tmp_path / "d"), download=True)
    assert calls == [(True, True), (False, True)] and x.shape == (20, 1, 28, 28) and len(yt) == 10

    def offline(root, train, download):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    from gmwae_fast.train.data import MissingDataError

    with pytest.raises(MissingDataError, match="could not be downloaded.*network unreachable"):
        load_mnist(str(tmp_path / "e"), download=True)


def _hold_lock(out: Path):
    """A separate live process that holds ``out``'s lock until killed (as a second trainer would)."""
    code = (
        "import sys, time; from pathlib import Path; from gmwae_fast.train.lock import output_lock\n"
        "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_of_one_out_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        assert run(data, out, "--steps", "2") == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"another training run (pid {holder.pid}) is writing to {out}" in line
        assert not (out / "metrics.jsonl").exists() and not ckpt(out).exists()  # the other run's files untouched
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file stays behind: a stale lock, taken over by the next run
    assert (out / ".lock").exists()
    assert run(data, out, "--steps", "2") == 0
    assert ckpt(out).is_file()
