"""Label-free scores of trained checkpoints (how the mutual-information score of gmwae_fast.train.select was checked).

    .venv/bin/python experiments/label_free_scores_2026-11-30/scores.py RUN/checkpoints/last.pt ...

For each checkpoint: q_D in eval mode on 5000 fixed training images (select.score_images), the mutual information
I(x; k) (metrics.mode_mutual_information, the score of select), the agreement rate of argmax q_D between each image
and 3 fixed random affine warps of it (the recipe's warp ranges), and the mean KL(q_D(x) || q_D(warp x)). No labels.
"""

import sys

import torch

from gmwae_fast.train import checkpoint as ck
from gmwae_fast.train.augment import AffineRange, affine_from_uniforms, affine_uniforms
from gmwae_fast.train.config import prior_and_model
from gmwae_fast.train.data import load_mnist, subset
from gmwae_fast.train.metrics import mode_mutual_information
from gmwae_fast.train.select import SCORE_IMAGES


def logits(model, x):
    return torch.cat([model.encoder.q_d_logits(x[i : i + 1000]) for i in range(0, len(x), 1000)])


def main(paths, data_dir="../shared/data"):
    torch.set_num_threads(1)
    xtr, ytr, _, _ = load_mnist(data_dir, download=False)
    x = subset(xtr, ytr, SCORE_IMAGES, 0)[0]
    warps = [affine_uniforms(len(x), torch.Generator().manual_seed(1000 + i)) for i in range(3)]
    for path in paths:
        st = ck.load_checkpoint(path)
        _, model = prior_and_model(st["config"])
        model.load_state_dict(st["model"])
        model.eval()
        with torch.no_grad():
            l0 = logits(model, x)
            agree, kl = [], []
            for u in warps:
                l1 = logits(model, affine_from_uniforms(x, u, AffineRange()))
                agree.append((l1.argmax(-1) == l0.argmax(-1)).float().mean().item())
                kl.append((l0.softmax(-1) * (l0.log_softmax(-1) - l1.log_softmax(-1))).sum(-1).mean().item())
        mi = mode_mutual_information(l0.softmax(-1))
        print(f"{path}  step {st['step']:5d}  MI {mi:.4f}  agreement {sum(agree) / 3:.4f}  KL {sum(kl) / 3:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
