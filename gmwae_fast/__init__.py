"""gmwae_fast: fused GPU/CPU kernels for the Wasserstein-autoencoder MMD penalty, and a GM-WAE trainer.

Public API::

    fast_imq_mmd(x, y, x_weights=None, y_weights=None, *, scales=WAE_SCALES, ...)  # fused multi-bandwidth IMQ MMD²
    IMQMMDLoss(...)                       # the same as an nn.Module
    mmd2(x, y, ..., kernel="imq"|"gaussian")  # one entry point for IMQ (fused) and Gaussian (tiled) MMD²; MMDLoss
    imq_mmd_terms(x, y, ...)              # its per-bandwidth pieces (self_x, self_y, cross, den_x, den_y)
    gm_reparameterize(mu, sigma_raw, logits, *, seed=None, noise=None, ...)  # fused per-mode reparameterisation
    WAE_SCALES, GAUJAC2019_SCALES         # bandwidth scale sets (the classic 7, the paper's 15; PAPER_SCALES: alias)
    bandwidths_for(x, scales, sigma2)     # the absolute bandwidths C_s = 2 d sigma2 s a call uses
    mean_sq_distance(x, y=None)           # mean pairwise squared distance of the pooled sample, O(N d), exact
    dan_bandwidths(source, target, ...)   # DAN's multi-kernel bandwidths on top of it
    mmd_test(x, y, *, permutations=1000, seed=None, ...)  # permutation two-sample test, O((n + m) d) memory
    available_backends(device=None, op="imq_mmd")  # backend -> None (usable) or the reason it is not
    backends.resolve_backend / last_backend         # which backend will run / ran last (gmwae_fast.backends)
    build_info()                          # versions and what was compiled
"""

from ._version import __version__
from .backends import available_backends, build_info
from .bandwidths import dan_bandwidths, mean_sq_distance
from .mmd import (
    GAUJAC2019_SCALES,
    PAPER_SCALES,
    WAE_SCALES,
    IMQMMDLoss,
    IMQMMDTerms,
    bandwidths_for,
    fast_imq_mmd,
    imq_mmd_terms,
)
from .multi_kernel import MMDLoss, mmd2
from .reparam import gm_reparameterize
from .two_sample import MMDTestResult, mmd_test

__all__ = [
    "fast_imq_mmd",
    "mmd2",
    "MMDLoss",
    "imq_mmd_terms",
    "gm_reparameterize",
    "mmd_test",
    "MMDTestResult",
    "IMQMMDTerms",
    "IMQMMDLoss",
    "GAUJAC2019_SCALES",
    "PAPER_SCALES",
    "bandwidths_for",
    "mean_sq_distance",
    "dan_bandwidths",
    "WAE_SCALES",
    "available_backends",
    "build_info",
    "__version__",
]


def __getattr__(name: str):  # gmwae_fast.selftest(...): the post-install check, imported on first use
    if name == "selftest":
        import importlib

        return importlib.import_module(".selftest", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
