"""One training run: :class:`Trainer`.

    trainer = Trainer(cfg, torch.device("cpu"), Path("runs/x"))   # env: a dist.DistEnv under torchrun
    trainer.setup()            # output directory, --resume checkpoint, data, networks, initial weights or restore
    interrupted = trainer.train()                # steps up to --steps: logs, evaluations, checkpoints
    if not interrupted and trainer.is_main:
        trainer.finish()       # final evaluation, summary.json, k-means baseline, figures

Outputs under the run's directory: metrics.jsonl (one JSON object per log/eval), summary.json,
checkpoints/last.pt (atomic and checksummed, every --ckpt-every steps, at the end and on Ctrl-C) and figures/*.png.
Data-parallel (``env`` given): every rank computes its rows of each global batch (:mod:`.dist`); rank 0 writes every
output. Problems with the inputs or the environment are :class:`RunError`; a non-finite loss or weight is
:class:`TrainingDiverged` (:meth:`Trainer.report_divergence` records it).
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from gmwae_fast.backends import last_backend, resolve_backend

from . import checkpoint as ck
from . import dist as dp
from .augment import AffineRange
from .config import (
    RESUME_MAY_CHANGE,
    TrainConfig,
    arch_differences,
    config_changes,
    describe_change,
    lr_at,
    prior_and_model,
)
from .data import Batcher, default_data_dir, load_mnist, split_validation, subset
from .ema import WeightAverage, delivered_weights
from .losses import add_balance, add_consistency, decodes_per_image, gmvae_loss, gmwae_loss, objective, pretrain_loss
from .metrics import evaluate, kmeans_baseline
from .progress import make_progress

#: The evaluation's entries that summary.json records.
_SUMMARY_METRICS = (
    "test_accuracy",
    "hungarian_accuracy",
    "nmi",
    "ari",
    "active_modes",
    "usage_kl",
    "recon_l2",
    "bernoulli_nll",
    "mmd",
    "mode_usage",
    "class_to_mode",
)
#: With --ema, the trained (not averaged) weights' metrics recorded beside the average's, as ``raw_<name>``.
_RAW_METRICS = ("test_accuracy", "active_modes", "usage_kl", "recon_l2")


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or non-finite values at ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class RunError(RuntimeError):
    """A problem with the inputs or the environment found while running: one ``error:`` line, exit status 2."""


class _Stop:
    """First Ctrl-C: finish the current step, checkpoint, exit. Second Ctrl-C: abort."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def append_jsonl(path: Path, rec: Dict) -> None:
    """Appends ``rec`` to ``path`` as one JSON line."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the records of ``path`` up to ``step`` (a resumed run rewrites what follows its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(l + "\n" for l in keep))


def machine_info(device: torch.device) -> Dict:
    """Platform, versions, CPU and thread counts (and the GPU) for summary.json."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class _LossModule(torch.nn.Module):
    """The networks and the loss as one module, so that DDP sees the whole step's forward."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, shards: dp.Shards):
        super().__init__()
        self.model, self.loss_fn, self.shards = model, loss_fn, shards

    def forward(self, x: torch.Tensor) -> Dict:
        return self.loss_fn(self.model, x, self.shards)


class Trainer:
    """Everything one training run holds, and its stages (see the module docstring).

    ``step_count``: completed optimiser steps; ``saved_step``: the step of the checkpoint this run wrote or resumed
    from (None before the first); ``last_eval``: the latest evaluation (with its ``step``)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, out: Path, env: Optional[dp.DistEnv] = None):
        self.cfg, self.device, self.out, self.env = cfg, device, Path(out), env
        self.prior: Any = None
        self.model: Any = None
        self.opt: Optional[torch.optim.Adam] = None
        self.gen: Optional[torch.Generator] = None
        self.batcher: Optional[Batcher] = None
        self.data: Tuple = ()  # x_train (on the device), y_train, x_test (on the device), y_test
        self.val: Tuple = ()  # x_val (on the device), y_val: the --val-size images held out of training
        self.step_count = 0
        self.wall_prev = self.wall = 0.0
        self.last_eval: Optional[Dict] = None
        self.saved_step: Optional[int] = None
        self.backends_used: Dict[str, str] = {}  # what the registry resolves before the first step
        self.shards: Optional[dp.Shards] = None  # this process's rows of each global batch
        self.step_fn: Optional[Callable] = None  # local rows -> loss dict (through DDP when data-parallel)
        self.batch_norm = "batch"  # how batch norm is computed: batch, per-shard, per-rank or sync
        self.ema: Optional[WeightAverage] = None  # --ema: the weight average (rank 0 only)
        self._t0 = 0.0  # perf_counter at the start of train()

    @property
    def is_main(self) -> bool:
        return self.env is None or self.env.is_main

    @property
    def world(self) -> int:
        return 1 if self.env is None else self.env.world

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / ck.CKPT_NAME

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """The output directory, the --resume checkpoint, the backends, the data and the networks; then the
        initial weights (a fresh run) or the checkpoint's state, and the step function."""
        self._on_main(self._prepare_out)
        saved = self.resume() if self.cfg.resume else None
        self._resolve_backends()
        self._load_data()
        self._build()
        if saved is None:
            self._start()
        else:
            self.restore(*saved)
        self._parallelise()
        if self.is_main and self.cfg.ema:
            self._start_average(saved[0] if saved else None)

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only (its result there, None elsewhere); an error it raises there is raised on every
        rank, so that no rank waits for a rank 0 that has stopped."""
        error, result = None, None
        if self.is_main:
            try:
                result = fn()
            except (RunError, ck.CheckpointError, OSError) as e:
                error = e
        if self.env is None:
            if error is not None:
                raise error
            return result
        message = dp.broadcast_object(self.env, None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise RunError(f"rank 0 stopped: {message}")
        return result

    def _prepare_out(self) -> None:
        """Creates <out>/checkpoints, checks that it is writable, removes temporaries of killed checkpoint writes."""
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"--out {self.out} exists and is not a directory")
        try:
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.ckpt_path.parent) as f:
                f.write(b"probe")
        except OSError as e:
            raise RunError(f"--out {self.out} is not a writable directory ({e.strerror or e})") from e
        n = ck.remove_stale_temporaries(self.ckpt_path)
        if n:
            print(
                f"removed {n} temporary file(s) of interrupted checkpoint writes in {self.ckpt_path.parent}",
                file=sys.stderr,
            )

    def _resolve_backends(self) -> None:
        for opt, op in (("mmd_backend", "imq_mmd"), ("reparam_backend", "gm_reparam")):
            requested = getattr(self.cfg, opt)
            try:
                self.backends_used[opt] = resolve_backend(requested, self.device, op)
            except (RuntimeError, ValueError) as e:
                raise RunError(f"--{opt.replace('_', '-')} {requested}: {e}") from e

    def _load_data(self) -> None:
        c = self.cfg
        x_tr, y_tr, x_te, y_te = load_mnist(c.data_dir or default_data_dir(), download=not c.no_download)
        try:
            x_tr, y_tr, x_val, y_val = split_validation(x_tr, y_tr, c.val_size)
        except ValueError as e:
            raise RunError(f"--val-size {c.val_size}: {e}") from e
        self.val = (x_val.to(self.device), y_val)
        x_tr, y_tr = subset(x_tr, y_tr, c.train_subset, c.seed)
        x_te, y_te = subset(x_te, y_te, c.test_subset, 0)
        if c.batch_size > len(x_tr):
            raise RunError(f"--batch-size {c.batch_size} exceeds the number of training images ({len(x_tr)})")
        if len(x_te) < 2:
            raise RunError(f"the evaluation needs at least 2 test images, the data has {len(x_te)}")
        self.data = (x_tr.to(self.device), y_tr, x_te.to(self.device), y_te)

    def _build(self) -> None:
        """Seeds every generator; the prior, the networks (initialised to the prior) and the batch order."""
        c = self.cfg
        random.seed(c.seed)
        np.random.seed(c.seed)
        torch.manual_seed(c.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(c.seed)
        prior, model = prior_and_model(c.to_dict())
        self.prior, model = prior.to(self.device), model.to(self.device)
        model.encoder.init_to_prior(self.prior.means, self.prior.diag_stds)
        if c.channels_last == "on" or (c.channels_last == "auto" and self.device.type == "cpu"):
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.batcher = Batcher(self.data[0], self.data[1], c.batch_size, c.seed)

    def _adam(self, params) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=self.cfg.lr, betas=(self.cfg.adam_beta1, 0.999))

    def _load_weights(self, state: Dict, source: str) -> None:
        try:
            self.model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()
            raise RunError(
                f"{source}: the checkpoint's parameters do not fit this network "
                f"({first[-1].strip() if first else type(e).__name__})"
            ) from e

    # ---------------------------------------------------------------------------------------------- fresh start
    def _start(self) -> None:
        """A fresh run: initial weights (--init-from, or the q_C pretraining), Adam, and the step-0 checkpoint.
        With several ranks rank 0 does it and DDP copies its weights to the others."""
        self._on_main(self._initial_weights)
        self.opt = self._adam(self.model.parameters())
        if self.is_main:
            self.save_checkpoint(0.0)

    def _initial_weights(self) -> None:
        c = self.cfg
        if self.metrics_path.exists():
            self.metrics_path.unlink()
        if c.init_from:
            st = ck.load_checkpoint(c.init_from, map_location=self.device)
            if isinstance(st.get("config"), dict):
                arch = arch_differences(st["config"], c.to_dict())
                if arch:
                    raise RunError(f"--init-from {c.init_from}: its networks have other sizes: {'; '.join(arch)}")
            self._load_weights(delivered_weights(st) if "model" in st else st, f"--init-from {c.init_from}")
        elif c.pretrain_steps:
            self._pretrain()

    def _pretrain(self) -> None:
        """--pretrain-steps steps matching the q_C nets to the prior moments (a ``pretrain`` record)."""
        c = self.cfg
        popt = self._adam(self.model.encoder.parameters())
        pb = Batcher(self.data[0], self.data[1], c.batch_size, c.seed + 7919)
        for i in range(c.pretrain_steps):
            x, _ = pb.batch(i)
            loss = pretrain_loss(self.model, x, prior=self.prior)
            popt.zero_grad(set_to_none=True)
            loss.backward()
            popt.step()
        append_jsonl(
            self.metrics_path,
            {"kind": "pretrain", "step": 0, "pretrain_steps": c.pretrain_steps, "pretrain_loss": loss.item()},
        )

    # ---------------------------------------------------------------------------------------------- resume
    def resume(self) -> Tuple[Dict, Dict]:
        """The verified checkpoint of <out> and the option changes it is resumed with (loaded by rank 0, sent to
        every rank); RunError for changes that are not allowed."""
        return dp.broadcast_object(self.env, self._on_main(self._load_for_resume))

    def _load_for_resume(self) -> Tuple[Dict, Dict]:
        st = ck.load_checkpoint(self.ckpt_path, map_location=self.device if self.env is None else "cpu")
        if not all(k in st for k in ("model", "optimizer", "rng", "step", "config")):
            raise ck.CheckpointError(
                f"{self.ckpt_path} is not a trainer checkpoint (it lacks the model, optimizer, rng, step or config "
                f"entry)"
            )
        now = self.cfg.to_dict()
        arch = arch_differences(st["config"], now)
        if arch:
            raise RunError(f"--resume: the checkpoint's networks have other sizes: {'; '.join(arch)}")
        changes = config_changes(st["config"], now)
        if st.get("world_size", 1) != self.world:  # per-rank batch norm on CPU: the ranks change what a step does
            changes["world_size"] = [st.get("world_size", 1), self.world]
        forced = [k for k in changes if k not in RESUME_MAY_CHANGE]
        if forced and not self.cfg.allow_config_change:
            raise RunError(
                f"--resume: {self.ckpt_path} was written with other options: "
                + "; ".join(_describe_forced(k, changes[k]) for k in forced)
                + ". Pass the checkpoint's values, or --allow-config-change to continue with the new ones"
            )
        return st, changes

    def restore(self, st: Dict, changes: Dict) -> None:
        """Continues from the verified checkpoint ``st``; option ``changes`` go to metrics.jsonl as a resume
        record."""
        self._load_weights(st["model"], f"--resume {self.ckpt_path}")
        self.opt = self._adam(self.model.parameters())
        self.opt.load_state_dict(st["optimizer"])
        for group in self.opt.param_groups:
            group["betas"] = (self.cfg.adam_beta1, 0.999)  # the lr is set before every step (lr_at)
        ck.set_rng_state(st["rng"], self.gen)
        self.step_count, self.wall_prev, self.last_eval = st["step"], st.get("wall_s", 0.0), st.get("last_eval")
        self.saved_step = self.step_count
        if not self.is_main:
            return
        truncate_metrics(self.metrics_path, self.step_count)
        if changes:
            forced = [k for k in changes if k not in RESUME_MAY_CHANGE]
            append_jsonl(
                self.metrics_path,
                {
                    "kind": "resume",
                    "step": self.step_count,
                    "config_changes": changes,
                    "allowed_by_allow_config_change": forced,
                },
            )
        print(f"resumed from {self.ckpt_path} at step {self.step_count}", file=sys.stderr)

    def _start_average(self, st: Optional[Dict]) -> None:
        """--ema: the weight average, restored from the checkpoint ``st`` when it has one, else started from the
        current weights."""
        self.ema = WeightAverage(self.model, self.cfg.ema)
        if st is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        elif st is not None:
            print(f"the weight average (--ema {self.cfg.ema:g}) starts at step {self.step_count}", file=sys.stderr)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model the run evaluates and delivers: the weight average with --ema, else the trained weights."""
        return self.model if self.ema is None else self.ema.model

    # ---------------------------------------------------------------------------------------------- the loss
    def _parallelise(self) -> None:
        """The shards of every batch this process computes and the step function (DDP on several ranks)."""
        c = self.cfg
        if self.env is None:
            self.shards = dp.Shards.single(c.batch_size, c.bn_shards)
            self.batch_norm = "per-shard" if c.bn_shards > 1 else "batch"
            self.step_fn = lambda x: self.loss(self.model, x, self.shards)
            return
        self.shards = dp.Shards.of_rank(c.batch_size, self.env.world, self.env.rank, self.env.group)
        self.model, self.batch_norm = dp.sync_batchnorm(self.model, self.env, self.device)
        self.step_fn = dp.wrap_ddp(_LossModule(self.model, self.loss, self.shards), self.env, self.device)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, sh: dp.Shards) -> Dict:
        """The loss dict of this process's rows ``x`` of a step's global batch: the objective, then
        --consistency and --balance when set."""
        c = self.cfg
        res = self._objective(model, x, sh)
        if c.consistency:
            warp = AffineRange(c.aug_rotate, c.aug_shear, c.aug_scale, c.aug_translate)
            res = add_consistency(res, model, x, gen=self.gen, gamma=c.consistency, warp=warp, shards=sh)
        if c.balance:
            res = add_balance(res, weight=c.balance, shards=sh)
        return {k: v for k, v in res.items() if k not in ("_terms", "_parts")}

    def _objective(self, model: torch.nn.Module, x: torch.Tensor, sh: dp.Shards) -> Dict:
        """The GM-WAE (eq. 16) or GM-VAE (eq. 3) loss dict."""
        c = self.cfg
        kw = dict(prior=self.prior, gen=self.gen, reparam_backend=c.reparam_backend, prune=c.mode_prune, shards=sh)
        if c.model == "gmwae":
            return gmwae_loss(
                model, x, lam=c.lam, n_prior=c.n_prior, backend=c.mmd_backend, recon_scale=c.recon_scale, **kw
            )
        return gmvae_loss(model, x, beta=c.beta, **kw)

    # ---------------------------------------------------------------------------------------------- training
    def step(self) -> Tuple[torch.Tensor, Dict, float]:
        """One optimiser step: ``(loss, loss dict, learning rate)``; TrainingDiverged (before the update) when the
        loss is not finite."""
        c = self.cfg
        x, _ = self.batcher.batch(self.step_count)
        res = self.step_fn(x[self.shards.first : self.shards.end])
        loss = res["loss"]  # the global batch's loss, the same on every rank
        if c.debug_nan_at_step is not None and self.step_count + 1 == c.debug_nan_at_step:
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"non-finite loss ({loss.item()}) at step {self.step_count + 1}", self.step_count + 1
            )
        self.opt.zero_grad(set_to_none=True)
        objective(res).backward()  # with DDP: gradients averaged over the ranks
        lr = lr_at(self.step_count, c)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.step_count += 1
        if c.debug_nan_weight_at_step == self.step_count:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        if self.ema is not None:
            self.ema.update(self.model)
        return loss, res, lr

    def train(self) -> bool:
        """Steps up to --steps with logging, evaluation and checkpoints; True when a Ctrl-C stopped it (after
        the step it was in, with a checkpoint)."""
        self._t0 = time.perf_counter()
        prog = make_progress(self.cfg, self.step_count) if self.is_main else None
        self.model.train()
        try:
            with _Stop() as stop:
                while self.step_count < self.end_step:
                    loss, res, lr = self.step()
                    stop.requested = self._stop_requested(stop.requested)
                    self._after_step(res, lr, loss, prog, stop.requested)
                    if stop.requested:
                        break
        finally:
            if prog:
                prog.close()
        self.wall = self._wall_now()
        if self.paused and not stop.requested:
            print(
                f"paused at step {self.step_count} (--stop-at); checkpoint saved to {self.ckpt_path} "
                f"(continue with --resume)",
                file=sys.stderr,
            )
        if stop.requested:
            print(
                f"interrupted at step {self.step_count}; checkpoint saved to {self.ckpt_path} (continue with --resume)",
                file=sys.stderr,
            )
        return stop.requested

    @property
    def end_step(self) -> int:
        """The last step of this invocation: --steps, or --stop-at when that comes first."""
        c = self.cfg
        return c.steps if c.stop_at is None else min(c.steps, c.stop_at)

    @property
    def paused(self) -> bool:
        """Whether the run stopped at --stop-at before --steps (no final summary; --resume continues it)."""
        return self.step_count < self.cfg.steps and self.step_count >= self.end_step

    def _wall_now(self) -> float:
        return self.wall_prev + time.perf_counter() - self._t0

    def _stop_requested(self, requested: bool) -> bool:
        """Whether every rank stops after this step (a Ctrl-C on any rank; the test hooks)."""
        c = self.cfg
        if c.debug_interrupt_at_step is not None and self.step_count == c.debug_interrupt_at_step:
            requested = True  # behaves exactly like a first Ctrl-C after this step
        if c.debug_kill_at_step == ((self.env.rank if self.env else 0), self.step_count):
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dying without any cleanup (tests)
        return dp.agree_any(self.env, requested, self.device)  # every rank stops at one step

    def _after_step(self, res: Dict, lr: float, loss: torch.Tensor, prog, stopping: bool) -> None:
        """The finiteness check before an evaluation or a checkpoint; then rank 0's train log, evaluation,
        progress line and checkpoint."""
        c, step = self.cfg, self.step_count
        last = step == self.end_step
        due_eval = step % c.eval_every == 0 or last
        due_ckpt = step % c.ckpt_every == 0 or last or stopping
        if due_eval or due_ckpt:
            self._require_finite()
        if not self.is_main:
            return
        if step % c.log_every == 0 or last:
            self._log_train(res, lr)
        if due_eval:
            self.evaluate()
        if prog:
            prog.update(step, loss.item(), self.last_eval)
        if due_ckpt:
            self.save_checkpoint(self._wall_now())

    def _log_train(self, res: Dict, lr: float) -> None:
        c = self.cfg
        rec = {
            "kind": "train",
            "step": self.step_count,
            "epoch": round(self.batcher.epoch_of(self.step_count), 4),
            "lr": lr,
            **{k: float(v.detach()) for k, v in res.items() if k not in ("pi", "logits") and not k.startswith("_")},
        }
        pi = res["pi"]
        active = torch.bincount(pi.argmax(1), minlength=c.modes) >= max(1, 0.01 * len(pi))
        rec["batch_active_modes"] = int(active.sum())
        if c.mode_prune > 0:
            rec["decoded_modes"] = decodes_per_image(pi, c.mode_prune)
        append_jsonl(self.metrics_path, rec)

    # ---------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> Dict:
        """Evaluates the delivered model on the held-out set now (an ``eval`` record; with --ema also the trained
        weights' ``raw_*`` metrics); the metrics, also ``last_eval``."""
        metrics = self._metrics(self.eval_model)
        if self.cfg.val_size:
            metrics.update(self._val_metrics(self.eval_model))
        if self.ema is not None:
            metrics.update({f"raw_{k}": v for k, v in self._metrics(self.model).items() if k in _RAW_METRICS})
        self.last_eval = dict(metrics, step=self.step_count)
        append_jsonl(
            self.metrics_path,
            {
                "kind": "eval",
                "step": self.step_count,
                "epoch": round(self.batcher.epoch_of(self.step_count), 4),
                **{
                    k: v
                    for k, v in self.last_eval.items()
                    if k not in ("heatmap", "class_to_mode", "val_class_to_mode", "step")
                },
            },
        )
        return self.last_eval

    def _val_metrics(self, model: torch.nn.Module) -> Dict:
        """The held-out metrics on the validation split, as ``val_<name>`` (``test_accuracy`` -> ``val_accuracy``)."""
        c = self.cfg
        kw = dict(backend=c.mmd_backend, reparam_backend=c.reparam_backend, n_recon=c.eval_recon, seed=c.seed + 1234)
        out = evaluate(model, self.val[0], self.val[1], self.prior, **kw)
        return {"val_" + k.replace("test_", ""): v for k, v in out.items() if k in _SUMMARY_METRICS}

    def _metrics(self, model: torch.nn.Module) -> Dict:
        c = self.cfg
        x_te, y_te = self.data[2], self.data[3]
        kw = dict(backend=c.mmd_backend, reparam_backend=c.reparam_backend, n_recon=c.eval_recon, seed=c.seed + 1234)
        return evaluate(model, x_te, y_te, self.prior, **kw)

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _require_finite(self) -> None:
        """TrainingDiverged when a parameter, buffer, Adam moment or averaged weight holds a NaN or an infinity."""
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.model.state_dict()
        bad = next(ck.nonfinite_entries(state), None)
        if bad is not None:
            raise TrainingDiverged(f"non-finite values in {bad} after step {self.step_count}", self.step_count)

    def save_checkpoint(self, wall: float) -> None:
        """Checkpoints the run with ``wall`` seconds of training so far (never with non-finite values:
        TrainingDiverged); a failed write is a RunError that says which checkpoint is kept."""
        self._require_finite()
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": ck.rng_state(self.gen),
            "step": self.step_count,
            "wall_s": wall,
            "last_eval": self.last_eval,
            "config": self.cfg.to_dict(),
            "world_size": self.world,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        try:
            ck.atomic_save(state, self.ckpt_path)
        except OSError as e:
            kept = (
                f"the checkpoint of step {self.saved_step} is kept"
                if self.saved_step is not None
                else "no checkpoint of this run was written"
            )
            raise RunError(
                f"could not write the checkpoint {self.ckpt_path} at step {self.step_count} ({e.strerror or e}); {kept}"
            ) from e
        self.saved_step = self.step_count

    def report_divergence(self, e: TrainingDiverged) -> None:
        """Rank 0 prints the ``error:`` line naming the last good checkpoint and records a ``diverged`` record
        (every rank sees the same global loss and stops at the same step)."""
        if self.saved_step is not None:
            where = (
                f"The last good checkpoint is kept at {self.ckpt_path} (step {self.saved_step}); lower --lr/--lam "
                f"or resume from it with --resume."
            )
        else:
            where = "No checkpoint of this run was written; lower --lr/--lam."
        msg = f"{e}; training stopped. {where}"
        if self.is_main:
            print(f"error: {msg}", file=sys.stderr)
            append_jsonl(self.metrics_path, {"kind": "diverged", "step": e.step, "message": msg})

    # ---------------------------------------------------------------------------------------------- the end
    def finish(self) -> Dict:
        """Rank 0, after train(): the final evaluation (if not just done), summary.json, the k-means baseline and
        the figures, and the closing lines on stdout; returns the summary."""
        c = self.cfg
        x_tr, _, x_te, y_te = self.data
        if self.last_eval is None or self.last_eval.get("step") != self.step_count:  # e.g. --steps <= saved step
            self.evaluate()
        summary = self._summary()
        if not c.no_kmeans:
            t = time.perf_counter()
            summary["kmeans_accuracy"] = kmeans_baseline(x_tr.cpu(), x_te.cpu(), y_te.cpu(), c.modes, seed=c.seed)
            summary["kmeans_wall_s"] = round(time.perf_counter() - t, 2)
            self.last_eval = dict(self.last_eval, kmeans_accuracy=summary["kmeans_accuracy"])
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        fig_dir = self.out / "figures"
        if not c.no_figures:
            from .figures import make_all_figures

            args = (self.eval_model, self.prior, x_te, y_te, self.last_eval, self.metrics_path, fig_dir, c)
            make_all_figures(*args)
        print(
            f"test accuracy {summary['test_accuracy']:.4f}, active modes {summary['active_modes']}/{c.modes}"
            + (f", k-means {summary['kmeans_accuracy']:.4f}" if "kmeans_accuracy" in summary else "")
            + f"; {self.step_count} steps in {self.wall:.1f}s on {self.device}"
        )
        print(f"summary: {self.out / 'summary.json'}")
        if not c.no_figures:
            print(f"figures: {fig_dir}/")
        return summary

    def _summary(self) -> Dict:
        """summary.json without the k-means baseline: the last evaluation's metrics and the run's description."""
        c, step = self.cfg, self.step_count
        return {
            **{k: self.last_eval[k] for k in _SUMMARY_METRICS if k in self.last_eval},  # an older run's: fewer
            "val_size": c.val_size,
            **{k: v for k, v in self.last_eval.items() if k.startswith("val_")},
            **{f"raw_{k}": self.last_eval[f"raw_{k}"] for k in _RAW_METRICS if f"raw_{k}" in self.last_eval},
            "model": c.model,
            "prior": c.prior,
            "recipe": c.recipe,
            "steps": step,
            "epochs": round(self.batcher.epoch_of(step), 3),
            "wall_s": round(self.wall, 2),
            "sec_per_step": round(self.wall / max(step, 1), 4),
            "device": str(self.device),
            "mmd_backend": last_backend("imq_mmd") or self.backends_used["mmd_backend"],
            "mmd_backend_requested": c.mmd_backend,
            "reparam_backend": last_backend("gm_reparam") or self.backends_used["reparam_backend"],
            "reparam_backend_requested": c.reparam_backend,
            "config": c.to_dict(),
            "machine": machine_info(self.device),
            "train_images": len(self.data[0]),
            "val_images": len(self.val[0]),
            "test_images": len(self.data[2]),
            "world_size": self.world,
            "dist_backend": None if self.env is None else self.env.backend,
            "batch_norm": self.batch_norm,
        }


def _describe_forced(key: str, change) -> str:
    if key == "world_size":
        return f"{change[0]} rank(s) in the checkpoint, {change[1]} now"
    return describe_change(key, *change)
