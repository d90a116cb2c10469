"""Ahead-of-time compile check of the Triton kernels: registers, spills and shared memory per kernel variant.

Compiles every Triton kernel of the package (the IMQ MMD values and row-pass kernels, the gm_reparam forward and
backward) for a CUDA architecture (default sm_90) **without a GPU**, with the exact argument types, constexprs and
divisibility hints that the launchers produce, and reads the resource usage from ``ptxas -v``::

    python benchmarks/triton_aot.py                  # markdown table, sm_90, triton's bundled ptxas
    python benchmarks/triton_aot.py --arch 80 --ptxas /usr/local/cuda/bin/ptxas --json out.json

How the signatures are obtained: each launcher (``kernels/imq_mmd.py``, ``kernels/gm_reparam.py``) is called on
small CPU tensors with its kernel replaced by a recorder, so the recorded arguments are those of a real GPU
launch (``FAST_RCP`` as on CUDA, 132 multiprocessors for the column split); the integer arguments are those of
the configuration named in the variant (e.g. ``N = 1000`` points in groups of 10, ``M = 100``, ``d = 10``,
``S = 15``: a GM-WAE training step), and they only matter through Triton's specialisation (``== 1`` becomes a
constant, multiples of 16 get a divisibility hint), computed by Triton's own ``native_specialize_impl``.
``n_regs`` of a compiled kernel is only filled when it is loaded on a GPU, hence ptxas.

Triton must not run in interpreter mode in this process (``TRITON_INTERPRET`` unset or 0 before the first
``import triton``); :func:`compile_all` raises ``RuntimeError`` otherwise (run it in a subprocess, as
``tests/test_triton_aot.py`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
SMS = 132  # multiprocessors assumed for the launchers' column split (H100 SXM / H200)

__all__ = ["compile_all", "variants", "ptxas_usage", "markdown", "main"]


def _interpreting() -> bool:
    from gmwae_fast.backends import triton_interpreting

    return triton_interpreting()


def _load(name: str):
    """``gmwae_fast.kernels.<name>``: this checkout's ``kernels/`` (see ``gmwae_fast/_kernel_modules.py``)."""
    from gmwae_fast import _kernel_modules

    return _kernel_modules.load(name)


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: List[Tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))

        return launch


@contextlib.contextmanager
def _recording(module, names: Sequence[str], patches: Dict[str, object]):
    """Replace the kernels ``names`` of ``module`` by recorders (and other attributes by ``patches``)."""
    saved = {n: getattr(module, n) for n in list(names) + list(patches)}
    recorders = {n: _Recorder(saved[n]) for n in names}
    try:
        for n, r in recorders.items():
            setattr(module, n, r)
        for n, v in patches.items():
            setattr(module, n, v)
        yield recorders
    finally:
        for n, v in saved.items():
            setattr(module, n, v)


def _source(fn, args: tuple, kwargs: dict):
    """``(ASTSource, options)`` for a recorded launch, specialised the way Triton's JIT specialises it; ``options``
    are the launch options of the call (``num_warps``, default 4, and ``maxnreg`` / ``num_stages`` when given)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {"num_warps": int(kwargs.pop("num_warps", 4))}
    options.update({k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if kwargs.get(k) is not None})
    kwargs = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
    values = list(args) + [kwargs.pop(p.name) for p in fn.params[len(args) :] if p.name in kwargs]
    if kwargs or len(values) != len(fn.params):
        raise RuntimeError(f"{fn.__name__}: recorded call does not match the kernel parameters ({sorted(kwargs)})")
    signature, constexprs, attrs = {}, {}, {}
    for idx, (p, v) in enumerate(zip(fn.params, values)):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(idx,)] = v
            continue
        kind, spec = native_specialize_impl(BaseBackend, v, False, True, True)[:2]
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[(idx,)] = v
        elif isinstance(spec, str):
            attrs[(idx,)] = BaseBackend.parse_attr(spec)
    return ASTSource(fn, signature, constexprs, attrs), options


_LAUNCH_OPTIONS = ("maxnreg", "num_stages")


# ---------------------------------------------------------------------------------------------------------------
# Variants: (name, variant description, launcher call on CPU tensors)
# ---------------------------------------------------------------------------------------------------------------


def _mmd_inputs(n: int, m: int, d: int, s: int, dtype: torch.dtype):
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = torch.zeros(n, d, dtype=dtype), torch.zeros(m, d, dtype=dtype)
    wa, wb = torch.full((n,), 1.0 / n, dtype=cdt), torch.full((m,), 1.0 / m, dtype=cdt)
    bw = torch.ones(s, dtype=torch.float64)
    return a, wa, b, wb, bw, torch.ones(s, dtype=torch.float64)


def _mmd_calls(d: int, dtype: torch.dtype, s: int = 15, n: int = 1000, group: int = 10, m: int = 100):
    """The launches of one GM-WAE-like step: self terms of ``x`` (``n`` points in groups of ``group``) and ``y``,
    the cross term, values and gradients."""
    a, wa, b, wb, bw, h = _mmd_inputs(n, m, d, s, dtype)
    tag = f"{str(dtype).replace('torch.', '')} d={d} S={s}"
    return [
        ("values", f"{tag} self unbiased", lambda K: K.imq_self(a, wa, bw, group, True)),
        ("values", f"{tag} self biased", lambda K: K.imq_self(a, wa, bw, group, False)),
        ("values", f"{tag} cross", lambda K: K.imq_cross(a, wa, b, wb, bw)),
        ("rowpass", f"{tag} self unbiased grad", lambda K: K.imq_self_grad(h, a, wa, bw, group, True)),
        ("rowpass", f"{tag} self biased grad", lambda K: K.imq_self_grad(h, a, wa, bw, group, False)),
        ("rowpass", f"{tag} cross grad (rows, columns)", lambda K: K.imq_cross_grad(h, a, wa, b, wb, bw)),
    ]


def _reparam_calls(dtype: torch.dtype, B: int = 100, K: int = 10, d: int = 10):
    mu = torch.zeros(B, K, d, dtype=dtype)
    logits = torch.zeros(B, K, dtype=dtype)
    seed = torch.zeros(1, dtype=torch.int64)
    tag = f"{str(dtype).replace('torch.', '')} B={B} K={K} d={d}"
    return [
        ("gm_reparam", f"{tag} seeded", lambda R: R.gm_reparam(mu, mu, logits, seed, None, "softplus")),
        (
            "gm_reparam",
            f"{tag} seeded backward",
            lambda R: R.gm_reparam_backward(mu, logits, mu, logits, seed, None, "softplus"),
        ),
    ]


def variants(quick: bool = False) -> List[Tuple[str, str, object, Callable]]:
    """``(family, variant, module, call)`` for every kernel configuration checked. ``quick``: float32 only, at the
    training size (d = 10) and d = 64, 15 bandwidths (the CI check)."""
    imq = _load("imq_mmd")
    out = []
    dtypes = [torch.float32] if quick else [torch.float32, torch.float64, torch.bfloat16]
    for dtype in dtypes:
        for d in (10, 64) if (quick or dtype == torch.float32) else (10,):
            out += [(f, v, imq, c) for f, v, c in _mmd_calls(d, dtype)]
    if not quick:
        out += [(f, v, imq, c) for f, v, c in _mmd_calls(130, torch.float32, s=15)]
        rep = _load("gm_reparam")
        for dtype in (torch.float32, torch.float64):
            out += [(f, v, rep, c) for f, v, c in _reparam_calls(dtype)]
    return out


_KERNELS = {
    "imq_mmd": ("_imq_values_kernel", "_imq_rowpass_kernel"),
    "gm_reparam": ("_gm_reparam_fwd_kernel", "_gm_reparam_bwd_kernel"),
}


def _record(module, call) -> List[Tuple[object, tuple, dict]]:
    """Run ``call(module)`` with the module's kernels recorded; returns ``(fn, args, kwargs)`` per launch, as on a
    CUDA device (``FAST_RCP`` forced on for float32, as ``_fast_rcp`` decides on CUDA)."""
    key = "imq_mmd" if hasattr(module, "_imq_values_kernel") else "gm_reparam"
    if key == "imq_mmd":  # CPU tensors pass the device check; the column split sees a GPU's multiprocessors
        patches = {"_interpreting": lambda: True, "_num_sms": lambda *_: SMS}
    else:  # (gm_reparam sizes its blocks by _interpreting(): only its input check is skipped)
        patches = {"_check": lambda *a, **k: None}
    with _recording(module, _KERNELS[key], patches) as recs:
        call(module)
    launches = []
    for rec in recs.values():
        for args, kwargs in rec.calls:
            if "FAST_RCP" in kwargs:
                kwargs = dict(kwargs, FAST_RCP=args[1].dtype == torch.float32)
            launches.append((rec.fn, args, kwargs))
    return launches


# ---------------------------------------------------------------------------------------------------------------
# ptxas
# ---------------------------------------------------------------------------------------------------------------

_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_usage(ptx: str, arch: int = 90, ptxas: Optional[str] = None) -> Dict[str, int]:
    """``{regs, spill_stores, spill_loads, spill_bytes, stack}`` of a PTX module from ``ptxas -v`` (the flags
    Triton compiles with: ``-lineinfo --regAllocOptLevel=2``; ``spill_bytes`` = stores + loads)."""
    if ptxas is None:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [
                ptxas,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={gpu}",
                str(src),
                "-o",
                str(Path(tmp) / "k.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}):\n{log}")
    regs, spill, stack = _RE_REGS.search(log), _RE_SPILL.search(log), _RE_STACK.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse the ptxas -v output:\n{log}")
    stores, loads = int(spill.group(1)), int(spill.group(2))
    return {
        "regs": int(regs.group(1)),
        "spill_stores": stores,
        "spill_loads": loads,
        "spill_bytes": stores + loads,
        "stack": int(stack.group(1)) if stack else 0,
    }


def compile_all(arch: int = 90, quick: bool = False, ptxas: Optional[str] = None, keep_ptx: bool = True) -> List[dict]:
    """Compile every kernel variant for ``sm_<arch>`` without a GPU.

    Returns one dict per launch: ``name`` (kernel), ``family``, ``variant``, ``regs``, ``spill_bytes``
    (``spill_stores + spill_loads``), ``spill_stores``, ``spill_loads``, ``stack``, ``smem`` (bytes of shared
    memory, from Triton's metadata), ``num_warps``, ``constexprs`` (name -> value), ``signature`` (name -> type)
    and ``ptx`` (the PTX text, when ``keep_ptx``)."""
    if _interpreting():
        raise RuntimeError(
            "TRITON_INTERPRET is set: the kernels are interpreter functions and cannot be compiled; "
            "run compile_all in a process started without it"
        )
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    rows, seen = [], {}
    for family, variant, module, call in variants(quick):
        for fn, args, kwargs in _record(module, call):
            src, options = _source(fn, args, kwargs)
            num_warps = options["num_warps"]
            key = (fn.__name__, src.hash(), tuple(sorted(options.items())))
            if key not in seen:
                compiled = triton.compile(src, target=target, options=options)
                ptx = compiled.asm["ptx"]
                seen[key] = dict(ptxas_usage(ptx, arch, ptxas), smem=int(compiled.metadata.shared), ptx=ptx)
            usage = dict(seen[key])
            if not keep_ptx:
                usage.pop("ptx")
            rows.append(
                dict(
                    usage,
                    name=fn.__name__,
                    family=family,
                    variant=variant,
                    num_warps=num_warps,
                    arch=arch,
                    signature={k: v for k, v in src.signature.items() if v != "constexpr"},
                    constexprs={fn.params[i[0]].name: _plain(v) for i, v in src.constants.items()},
                )
            )
    return rows


def _plain(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def markdown(rows: List[dict]) -> str:
    """A markdown table of :func:`compile_all` rows."""
    out = [
        "| kernel | variant | key constexprs | warps | regs | spill B | stack B | smem B |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = (
        "SELF",
        "UNBIASED",
        "MASK_GROUPS",
        "WITH_VALUES",
        "BLOCK_I",
        "BLOCK_J",
        "BLOCK_G",
        "G_LOOP",
        "BLOCK_C",
        "ROWS",
        "F64",
    )
    for r in rows:
        cx = " ".join(f"{k}={_short(r['constexprs'][k])}" for k in keys if k in r["constexprs"])
        out.append(
            f"| `{r['name']}` | {r['variant']} | {cx} | {r['num_warps']} | {r['regs']} | "
            f"{r['spill_bytes']} | {r['stack']} | {r['smem']} |"
        )
    return "\n".join(out)


def _short(v):
    return int(v) if isinstance(v, bool) else v


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90)")
    p.add_argument("--ptxas", default=None, help="ptxas binary (default: the one bundled with triton)")
    p.add_argument("--quick", action="store_true", help="float32 at d = 10 and d = 64 only (the CI check)")
    p.add_argument("--json", default=None, help="also write the rows (without PTX) to this file ('-': stdout)")
    args = p.parse_args(argv)
    rows = compile_all(args.arch, quick=args.quick, ptxas=args.ptxas, keep_ptx=False)
    if args.json == "-":
        json.dump(rows, sys.stdout)
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    import triton

    print(f"sm_{args.arch}, triton {triton.__version__}, ptxas {args.ptxas or 'bundled with triton'}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    sys.exit(main())
