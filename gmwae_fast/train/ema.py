"""An exponential moving average of the networks' weights (``--ema DECAY``): the model a run evaluates and delivers.

After every optimiser step ``a <- d * a + (1 - d) * w`` for every floating-point parameter and buffer ``w`` (batch
norm's running statistics included; integer buffers such as ``num_batches_tracked`` are copied), with the warm-up
``d = min(DECAY, (1 + n) / (10 + n))`` at the n-th update (n = 0, 1, ...) so that the first updates do not keep the
weights the average started from. The average never feeds back into training: a run with ``--ema`` takes exactly
the steps of the same run without it. It is saved in the checkpoint under ``"ema"`` (:func:`delivered_weights`
reads it) and may be switched on, off or changed on ``--resume``: an average that a checkpoint lacks starts from
the resumed weights.

Example::

    avg = WeightAverage(model, decay=0.999)
    for x in batches:
        ...; opt.step(); avg.update(model)
    evaluate(avg.model)
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import torch

__all__ = ["WeightAverage", "delivered_weights"]


class WeightAverage:
    """The running average of ``model``'s parameters and buffers, held in ``self.model`` (a copy, eval mode, no
    gradients). ``decay`` in [0, 1)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the weight-average decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    def _pairs(self, model: torch.nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[Tuple]]:
        mine = dict(self.model.state_dict(keep_vars=True))
        theirs = dict(model.state_dict(keep_vars=True))
        if mine.keys() != theirs.keys():
            raise RuntimeError("the weight average and the model have different entries")
        avg, cur, exact = [], [], []
        for name, a in mine.items():
            w = theirs[name].detach()
            if a.is_floating_point():
                avg.append(a.data)
                cur.append(w)
            else:
                exact.append((a.data, w))
        return avg, cur, exact

    @property
    def current_decay(self) -> float:
        """The decay the next update uses (the warm-up rule)."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One averaging step towards ``model``'s current weights."""
        avg, cur, exact = self._pairs(model)
        torch._foreach_lerp_(avg, cur, 1.0 - self.current_decay)
        for a, w in exact:
            a.copy_(w)
        self.updates += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores the average and its update count (the decay stays this object's: ``--ema`` may change on
        ``--resume``)."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def delivered_weights(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights a trainer checkpoint delivers: the average when the run kept one (``--ema``), else the trained
    weights."""
    ema = state.get("ema")
    return ema["model"] if isinstance(ema, dict) and "model" in ema else state["model"]
