"""gmwae_fast: fused GPU/CPU kernels for the Wasserstein-autoencoder MMD penalty, and a GM-WAE trainer.

Public API::

    fast_imq_mmd(x, y, x_weights=None, y_weights=None, *, scales=PAPER_SCALES, ...)  # fused multi-bandwidth IMQ MMD²
    IMQMMDLoss(...)                       # the same as an nn.Module
    imq_mmd_terms(x, y, ...)              # its per-bandwidth pieces (self_x, self_y, cross, den_x, den_y)
    gm_reparameterize(mu, sigma_raw, logits, *, seed=None, noise=None, ...)  # fused per-mode reparameterisation
    PAPER_SCALES, WAE_SCALES              # bandwidth scale sets
    available_backends(device=None)       # backend -> None (usable) or the reason it is not
    build_info()                          # versions and what was compiled
"""
from ._version import __version__
from .backends import available_backends, build_info
from .mmd import PAPER_SCALES, WAE_SCALES, IMQMMDLoss, IMQMMDTerms, fast_imq_mmd, imq_mmd_terms

__all__ = [
    "fast_imq_mmd",
    "imq_mmd_terms",
    "IMQMMDTerms",
    "IMQMMDLoss",
    "PAPER_SCALES",
    "WAE_SCALES",
    "available_backends",
    "build_info",
    "__version__",
]

try:  # the per-mode reparameterisation op family (gmwae_fast/reparam.py)
    from .reparam import gm_reparameterize  # noqa: F401

    __all__.append("gm_reparameterize")
except ImportError as _exc:  # pragma: no cover - only while the module is missing
    if "gmwae_fast.reparam" not in str(_exc):
        raise


def __getattr__(name: str):  # gmwae_fast.selftest(...): the post-install check, imported on first use
    if name == "selftest":
        import importlib

        return importlib.import_module(".selftest", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
