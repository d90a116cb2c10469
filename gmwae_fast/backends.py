"""The backend registry: the one place that says which backends exist, where each can run, and which one runs.

Backends (:data:`REGISTRY`, in ``auto`` priority order):

* ``"cuda"``: fused CUDA kernels of the compiled extension ``gmwae_fast._C``; CUDA tensors.
* ``"cpu"``: fused C++ kernels of ``gmwae_fast._C``; CPU tensors.
* ``"triton"``: fused Triton kernels (``gmwae_fast.kernels``); CUDA tensors, or CPU tensors when the Triton
  interpreter is on (:func:`triton_interpreting`; slow, used by CI to test the kernels without a GPU).
* ``"reference"``: plain PyTorch (autograd by PyTorch); always available, any device; the oracle of the tests.

Each op family (:data:`OP_FAMILIES`: ``"imq_mmd"`` for :func:`gmwae_fast.fast_imq_mmd`, ``"gm_reparam"`` for
:func:`gmwae_fast.gm_reparameterize`) asks the registry the same questions, so availability is per
``(backend, op family, device)``: an extension built before the ``gm_reparam`` family existed runs the MMD on
``cpu``/``cuda`` and the reparameterisation on the next backend of the ``auto`` order.

``"auto"`` picks, for the inputs' device, the first usable backend of :func:`auto_order` (``cuda`` > ``triton`` >
``reference`` on a GPU, ``cpu`` > ``reference`` on a CPU: the interpreter is never picked). An explicitly requested
backend that cannot run raises :class:`RuntimeError` saying why. The ops record the backend that really ran
(:func:`last_backend`); :func:`resolve_backend` says which one will run. A compiled extension that fails to load is
reported once, as a warning, and the other backends keep working. Adding a backend: ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
import warnings
from types import ModuleType
from typing import Callable, NamedTuple, Optional, Union

import torch

from . import guard

__all__ = [
    "Backend",
    "REGISTRY",
    "BACKENDS",
    "OP_FAMILIES",
    "auto_order",
    "backend_choices",
    "check_backend_name",
    "available_backends",
    "build_info",
    "resolve_backend",
    "select_backend",
    "last_backend",
    "unavailable_reason",
    "triton_interpreting",
    "extension",
    "extension_error",
    "assume_constant_result",
    "torch_mismatch",
]

Device = Union[str, torch.device, None]

#: Op family -> (public function, the compiled op whose dispatcher kernels say whether ``_C`` has this family).
OP_FAMILIES: dict[str, tuple[str, str]] = {
    "imq_mmd": ("fast_imq_mmd", "gmwae_fast::imq_self"),
    "gm_reparam": ("gm_reparameterize", "gmwae_fast::gm_reparam"),
}


class Backend(NamedTuple):
    """One registry entry.

    ``devices``: device types whose tensors it can run (``None``: every device). ``auto_devices``: device types on
    which ``"auto"`` may pick it (``None``: every device). ``priority``: ``auto`` tries lower numbers first.
    ``reason``: ``reason(device, op) -> None`` if it runs op family ``op`` on ``device`` here, else why not
    (called only for a device in ``devices``).
    """

    name: str
    devices: Optional[tuple[str, ...]]
    auto_devices: Optional[tuple[str, ...]]
    priority: int
    reason: Callable[[torch.device, str], Optional[str]]


_ext: Optional[ModuleType] = None
_ext_error: Optional[str] = None
_ext_loaded = False


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (about 2 s) at import time.

    The public decorator imports ``torch._dynamo`` only to set the marker attribute that Dynamo reads when it
    traces a call (``torch/_dynamo/decorators.py``); this sets the same attribute, or defers to the public
    decorator when ``torch._dynamo`` is already imported. ``tests/test_install.py`` checks that both agree.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def _load_extension() -> None:
    global _ext, _ext_error, _ext_loaded
    if _ext_loaded:
        return
    _ext_loaded = True
    cfg = _build_config()
    _ext_error = torch_mismatch(cfg.get("torch_version"), cfg.get("torch_cxx11_abi"))
    if _ext_error is None:
        try:
            _ext = importlib.import_module("gmwae_fast._C")
            _ext_error = torch_mismatch(getattr(_ext, "TORCH_VERSION", None), None)
        except Exception as exc:  # ImportError, or an OSError / undefined symbol from a broken build
            _ext_error = f"the compiled extension gmwae_fast._C could not be loaded ({type(exc).__name__}: {exc})"
    if _ext_error is not None:
        _ext = None
        if os.environ.get("GMWAE_FAST_QUIET_EXT", "0") != "1":
            warnings.warn(
                f"gmwae_fast: {_ext_error}; the 'cpu' and 'cuda' backends are disabled, 'triton' and "
                "'reference' still work. " + _REBUILD_HINT,
                RuntimeWarning,
                stacklevel=3,
            )


_REBUILD_HINT = (
    "To rebuild against the running torch: pip install --no-build-isolation --force-reinstall "
    "--no-deps <the gmwae_fast sdist or checkout> (in a checkout: bash scripts/setup.sh)."
)


def torch_mismatch(built_version: Optional[str], built_cxx11_abi: Optional[bool]) -> Optional[str]:
    """Why an extension built with torch ``built_version`` (``"2.14.1+cu130"``, or ``"2.14.1"`` as in
    ``_C.TORCH_VERSION``) and ``built_cxx11_abi`` cannot be loaded by the running torch, or ``None`` (also when
    the build facts are unknown). Only the ``major.minor.patch`` part is compared when the local part is missing.
    """
    running = torch.__version__
    if built_version is not None:
        same = running == built_version if "+" in built_version else running.split("+")[0] == built_version
        if not same:
            return (
                f"gmwae_fast._C was built against torch {built_version} but torch {running} is running "
                "(a C++ extension must be built with the torch it runs with)"
            )
    abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    if built_cxx11_abi is not None and bool(built_cxx11_abi) != abi:
        return (
            f"gmwae_fast._C was built with _GLIBCXX_USE_CXX11_ABI={int(built_cxx11_abi)} but the running torch "
            f"uses {int(abi)}"
        )
    return None


def extension() -> Optional[ModuleType]:
    """The loaded ``gmwae_fast._C`` module, or ``None`` (see :func:`extension_error`)."""
    _load_extension()
    return _ext


def extension_error() -> Optional[str]:
    """Why ``gmwae_fast._C`` is not loaded, or ``None`` when it is."""
    _load_extension()
    return _ext_error


def _build_config() -> dict:
    try:
        from . import _build_config as cfg  # generated by setup.py
    except ImportError:
        return {}
    return {k: getattr(cfg, k) for k in dir(cfg) if not k.startswith("_")}


def _compiled_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``gmwae_fast._C`` has a ``dispatch_key`` kernel of op family ``op`` (False for an unknown op)."""
    if extension() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP_FAMILIES[op][1], dispatch_key)
    except RuntimeError:  # the op is not registered: an extension built before this op family existed
        return False


@functools.lru_cache(maxsize=None)
def _triton_import_error(op: str) -> Optional[str]:
    """Why the Triton kernels of op family ``op`` (module ``gmwae_fast.kernels.<op>``) cannot be imported, or
    ``None``: the imports the backend really needs (triton, then the kernel module), tried once."""
    try:
        importlib.import_module("triton")
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    from . import _kernel_modules

    try:
        _kernel_modules.load(op)
    except Exception as exc:
        return f"the Triton kernels gmwae_fast.kernels.{op} could not be imported ({type(exc).__name__}: {exc})"
    return None


#: Values of ``TRITON_INTERPRET`` that Triton reads as "on" (its ``getenv_bool``: case-insensitive, not stripped).
_TRUE = ("1", "true", "on", "yes", "y")


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: ``TRITON_INTERPRET`` read with Triton's own rule (``1``,
    ``true``, ``on``, ``yes``, ``y``, any case). Triton reads it when a kernel module is first imported, so set it
    before that. The one definition used by the registry and the Triton launchers."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def _reference_reason(dev: torch.device, op: str) -> Optional[str]:
    return None


def _triton_reason(dev: torch.device, op: str) -> Optional[str]:
    err = _triton_import_error(op)
    if err:
        return err
    if dev.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if triton_interpreting():
        return None
    return "triton runs CPU tensors only under TRITON_INTERPRET=1 (set it before importing triton)"


def _compiled_family_reason(op: str, key: str) -> Optional[str]:
    if extension() is None:
        return extension_error()
    if _compiled_kernel(op, key):
        return None
    if not any(_compiled_kernel(op, k) for k in ("CPU", "CUDA")):
        if op != "imq_mmd" and (_compiled_kernel("imq_mmd", "CPU") or _compiled_kernel("imq_mmd", "CUDA")):
            return (
                f"gmwae_fast._C was built before the {op} ops existed (it has the imq_mmd kernels only); "
                "rebuild the extension"
            )
    if key == "CUDA":
        return (
            f"gmwae_fast._C was built without the CUDA {op} kernels (no CUDA toolkit at build time, or "
            "GMWAE_FAST_SKIP_CUDA=1)"
        )
    return f"gmwae_fast._C was built without the CPU {op} kernels"


def _cpu_reason(dev: torch.device, op: str) -> Optional[str]:
    return _compiled_family_reason(op, "CPU")


def _cuda_reason(dev: torch.device, op: str) -> Optional[str]:
    reason = _compiled_family_reason(op, "CUDA")
    if reason is None and not torch.cuda.is_available():
        return "no CUDA device is available"
    return reason


def _guard_reason(backend: str, op: str, dev: torch.device) -> Optional[str]:
    err = guard.failure(backend, op, dev)
    return None if err is None else f"it failed its first-use check on this device ({err})"


#: name -> entry. ``auto`` order on a device: its usable entries by ``priority`` (ties: registry order).
REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cuda", ("cuda",), ("cuda",), 0, _cuda_reason),
        Backend("cpu", ("cpu",), ("cpu",), 0, _cpu_reason),
        Backend("triton", ("cuda", "cpu"), ("cuda",), 10, _triton_reason),
        Backend("reference", None, None, 100, _reference_reason),
    )
}

#: The backend names (what ``backend=`` accepts besides ``"auto"``).
BACKENDS: tuple[str, ...] = ("reference", "triton", "cpu", "cuda")
assert set(BACKENDS) == set(REGISTRY), "BACKENDS and REGISTRY must name the same backends"


def backend_choices() -> tuple[str, ...]:
    """Every value ``backend=`` accepts: ``("auto", *BACKENDS)`` (for command-line choices)."""
    return ("auto",) + BACKENDS


def check_backend_name(name: object) -> str:
    """``name`` if it is ``"auto"`` or a registered backend; :class:`TypeError` / :class:`ValueError` otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


def _check_op(op: object) -> str:
    if op not in OP_FAMILIES:
        raise ValueError(f"unknown op family {op!r}; expected one of {tuple(OP_FAMILIES)}")
    return op


def _device(device: Device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_order(device: Device = None) -> tuple[str, ...]:
    """The backends ``"auto"`` tries on tensors of ``device``, first choice first (usable or not), e.g.
    ``("cuda", "triton", "reference")`` for ``"cuda"`` and ``("cpu", "reference")`` for ``"cpu"``."""
    kind = _device(device).type
    names = [b.name for b in REGISTRY.values() if b.auto_devices is None or kind in b.auto_devices]
    return tuple(sorted(names, key=lambda n: REGISTRY[n].priority))


def unavailable_reason(backend: str, device: Device = None, op: str = "imq_mmd") -> Optional[str]:
    """``None`` if ``backend`` can run op family ``op`` on tensors of ``device`` here, else a sentence saying why not.

    ``device=None`` asks about the default device (CUDA when present, else CPU).
    """
    if backend not in REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    entry, dev = REGISTRY[backend], _device(device)
    _check_op(op)
    if entry.devices is not None and dev.type not in entry.devices:
        if backend in ("cpu", "cuda"):
            return f"the {backend!r} backend needs {backend.upper()} tensors, got {dev.type!r} tensors"
        return f"{backend} does not support device type {dev.type!r}"
    return entry.reason(dev, op) or _guard_reason(backend, op, dev)


def resolve_backend(requested: str, device: Union[str, torch.device], op: str = "imq_mmd") -> str:
    """The backend that runs op family ``op`` on tensors of ``device`` for ``requested`` (``"auto"`` or a name):
    the answer to "which backend will run". Does not record anything (see :func:`select_backend`).

    Raises :class:`ValueError` for an unknown name or op family and :class:`RuntimeError` (with the reason) for a
    known backend that cannot run here. Safe to call inside :func:`torch.compile`: the answer depends only on the
    arguments, so the compiler evaluates it once while tracing and keeps the result as a constant.

    Example::

        >>> gmwae_fast.backends.resolve_backend("auto", "cpu", op="gm_reparam")
        'cpu'
    """
    check_backend_name(requested)
    return _resolve(requested, str(device), _check_op(op))


@assume_constant_result
def _resolve(requested: str, device: str, op: str) -> str:
    # Inspects imports, environment variables and the dispatcher, none of which torch.compile can trace.
    dev = torch.device(device)
    if requested == "auto":
        for name in auto_order(dev):
            if unavailable_reason(name, dev, op) is None:
                return name
        return "reference"
    reason = unavailable_reason(requested, dev, op)
    if reason is not None:
        raise RuntimeError(f"backend {requested!r} cannot run on {dev.type} tensors ({OP_FAMILIES[op][0]}): {reason}")
    return requested


#: op family -> the backend its last call ran on (written by :func:`select_backend`).
_LAST: dict[str, str] = {}


def select_backend(requested: str, device: Union[str, torch.device], op: str) -> str:
    """:func:`resolve_backend`, and record the answer as the backend op family ``op`` runs (the ops call this
    right before running; also under :func:`torch.compile`, which replays the record on every call)."""
    name = resolve_backend(requested, device, op)
    if not torch.compiler.is_compiling() and guard.check(name, op, device) is not None:
        name = resolve_backend(requested, device, op)  # the route is now disabled: the next one, or the reason
    _LAST[op] = name
    return name


def last_backend(op: str = "imq_mmd") -> Optional[str]:
    """The backend the last call of op family ``op`` (default ``"imq_mmd"``: :func:`gmwae_fast.fast_imq_mmd`,
    ``"gm_reparam"``: :func:`gmwae_fast.gm_reparameterize`) in this process ran on, or ``None`` before any call.

    Example::

        >>> z, pi = gmwae_fast.gm_reparameterize(mu, sigma_raw, logits)
        >>> gmwae_fast.backends.last_backend("gm_reparam")
        'cpu'
    """
    return _LAST.get(_check_op(op))


def available_backends(device: Device = None, op: str = "imq_mmd") -> dict[str, Optional[str]]:
    """Each backend mapped to ``None`` if it can run op family ``op`` here (on ``device``, default: CUDA if
    present, else CPU) or to the reason it cannot.

    Example::

        >>> gmwae_fast.available_backends("cpu")
        {'reference': None, 'triton': 'triton runs CPU tensors only under TRITON_INTERPRET=1 ...',
         'cpu': None, 'cuda': "the 'cuda' backend needs CUDA tensors, got 'cpu' tensors"}
    """
    return {name: unavailable_reason(name, device, op) for name in BACKENDS}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_skipped_reason(cfg: dict) -> str:
    if extension() is None:
        return f"no compiled extension ({extension_error()})"
    return cfg.get("cuda_skipped_reason") or cfg.get("build_warning") or "not recorded by this build"


def build_info() -> dict:
    """What this installation was built with and can run.

    Keys: ``version``, ``torch``, ``torch_cuda`` (CUDA version torch was built for), ``triton``, ``cpu_compiled``,
    ``cuda_compiled``, ``cuda_arch_list`` (architectures the CUDA kernels were compiled for),
    ``cuda_skipped_reason`` (why there are no CUDA kernels, or ``None``), ``built_with_torch``,
    ``extension_error``, ``cuda_device`` (name of the current GPU or ``None``) and ``guard`` (the GPU routes
    checked at first use so far: ``"backend:op@device"`` -> ``None`` or why the route was disabled;
    :mod:`gmwae_fast.guard`).
    """
    cfg = _build_config()
    from ._version import __version__

    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cpu_compiled": _compiled_kernel("imq_mmd", "CPU"),
        "cuda_compiled": _compiled_kernel("imq_mmd", "CUDA"),
        "cuda_arch_list": cfg.get("cuda_arch_list") if _compiled_kernel("imq_mmd", "CUDA") else None,
        "cuda_skipped_reason": None if _compiled_kernel("imq_mmd", "CUDA") else _cuda_skipped_reason(cfg),
        "built_with_torch": cfg.get("torch_version"),
        "extension_error": extension_error(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "guard": guard.report(),
    }
