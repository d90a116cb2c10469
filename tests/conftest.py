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
