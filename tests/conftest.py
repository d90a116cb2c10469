"""Shared test configuration.

Without a GPU, Triton kernels are tested on CPU tensors through the Triton interpreter; the variable must be set
before triton is first imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import gmwae_fast  # noqa: E402

DEVICES = ["cpu", "cuda"]
#: (device, backend) pairs every backend test is parametrised over; unusable ones skip with the reason.
DEVICE_BACKENDS = [
    ("cpu", "reference"),
    ("cpu", "cpu"),
    ("cpu", "triton"),
    ("cuda", "reference"),
    ("cuda", "cuda"),
    ("cuda", "triton"),
]


def skip_unless_usable(device: str, backend: str, op: str = "imq_mmd") -> None:
    """Skip unless ``backend`` runs op family ``op`` (``"imq_mmd"`` or ``"gm_reparam"``) on ``device`` here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    reason = gmwae_fast.available_backends(device, op=op)[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} unusable on {device}: {reason}")


def build_csrc_testing(program: str, out_dir) -> str:
    """Compile ``csrc/testing/<program>.cpp`` (the SIMT emulator programs: host C++, no GPU) into ``out_dir`` and
    return the executable's path; skips when no C++ compiler is on PATH."""
    import shutil
    import subprocess

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = os.path.join(str(out_dir), program)
    src = os.path.join(root, "csrc", "testing", program + ".cpp")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-I" + os.path.join(root, "csrc"), src, "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    return exe


def interpreted(device: str, backend: str) -> bool:
    """Triton on CPU tensors runs in the (slow) interpreter: such tests use smaller sizes."""
    return backend == "triton" and device == "cpu"


@pytest.fixture(params=DEVICE_BACKENDS, ids=[f"{d}-{b}" for d, b in DEVICE_BACKENDS])
def device_backend(request):
    """(device, backend) pairs usable for the op family of the test module (its ``OP_FAMILY``, default imq_mmd)."""
    device, backend = request.param
    skip_unless_usable(device, backend, op=getattr(request.module, "OP_FAMILY", "imq_mmd"))
    return device, backend


def data_dir() -> str:
    """MNIST location for tests: $GMWAE_DATA, else ../shared/data next to the repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("GMWAE_DATA", os.path.normpath(os.path.join(here, "..", "..", "shared", "data")))


def flat_normalised(x, y, xw=None, yw=None):
    """``(a, wa, gx, b, wb, gy)``: the points flattened to rows (float64, autograd kept), the weights normalised to
    sum to 1 (float64; ones when None) and the group sizes, as every brute force of the tests needs them."""

    def side(t, w):
        p = t.reshape(-1, t.shape[-1]).double()
        w = torch.ones(p.shape[0], dtype=torch.float64) if w is None else w.reshape(-1).double()
        return p, w / w.sum(), 1 if t.dim() == 2 else t.shape[1]

    return (*side(x, xw), *side(y, yw))


def brute_force(x, y, xw=None, yw=None, *, bandwidths, unbiased=True, eps=0.0):
    """(S,) MMD² per bandwidth, float64, materialised, straight from the contract."""
    a, wa, gx, b, wb, gy = flat_normalised(x, y, xw, yw)
    c = torch.tensor(bandwidths, dtype=torch.float64)[:, None, None]

    def k(p, q):
        return c / (c + ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)[None] + eps)

    def self_term(p, w, g):
        kk = k(p, p)
        if not unbiased:
            return (w[:, None] * w[None, :] * kk).sum((1, 2))
        ids = torch.arange(p.shape[0]) // g
        keep = (ids[:, None] != ids[None, :]).double()
        wg = w.view(-1, g).sum(1)  # sum over pairs of different groups: no cancellation for a dominant group
        den = (wg[:, None] * wg[None, :] * (1.0 - torch.eye(wg.shape[0], dtype=torch.float64))).sum()
        return (w[:, None] * w[None, :] * kk * keep).sum((1, 2)) / den

    cross = (wa[:, None] * wb[None, :] * k(a, b)).sum((1, 2))
    return self_term(a, wa, gx) + self_term(b, wb, gy) - 2.0 * cross
