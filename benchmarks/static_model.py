"""Static sm_90 performance model of the imq_mmd kernels: compile, read the SASS, count, predict. No GPU needed.

    .venv/bin/python benchmarks/static_model.py                  # -> benchmarks/results/sm90-static.md
    .venv/bin/python benchmarks/static_model.py --out - --no-triton

What it does
------------
1. Compiles the CUDA tile kernels of ``csrc/imq_mmd_cuda_kernels.cuh`` for sm_90 with nvcc (``-cubin
   -arch=sm_90 -lineinfo`` plus the nvcc flags of ``setup.py`` and torch's common nvcc flags).  The translation
   unit is a generated one that includes the ``.cuh`` (the device code of ``csrc/imq_mmd_cuda.cu``, free of
   torch headers) and instantiates every kernel template the ``.cu`` launches, so it compiles in seconds instead
   of minutes; ``-lineinfo`` does not change the code (the SASS is identical without it).  A small host program
   built from the same header prints the launch plan (blocks, tiles per block, dynamic shared memory).
   Everything is cached under ``build/static_model/<hash of sources, flags, nvcc version>/``.
2. Disassembles with ``nvdisasm -gi`` (source line and inlining chain of every instruction) and reads
   registers / spills from ``ptxas -v`` and ``cuobjdump -res-usage``; occupancy from the sm_90 limits.
3. Finds the loops of the SASS (a branch back to an earlier address), names each by the source line of its
   back-edge, classifies every opcode into a pipe (:func:`classify`), and counts the *dynamic* warp
   instructions of one 64 x 64 tile of pairs with the trip-count model of :data:`TRIP_MODEL` (see
   :func:`tile_counts`): the instructions per pair are ``32 * warp instructions per tile / 4096``.
4. Predicts times on an H100 SXM / H200 with an issue-bound model (:func:`predict`).

Triton kernels: ``benchmarks/triton_aot.py`` (``compile_all(arch=90)``), when present, supplies their
registers, spills and PTX; they are listed, not modelled per pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CACHE_DIR = os.path.join(ROOT, "build", "static_model")
KERNEL_HEADER = "imq_mmd_cuda_kernels.cuh"
SOURCES = ("imq_mmd_cuda_kernels.cuh", "imq_math.h")
SETUP_NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-DGMWAE_FAST_WITH_CUDA")  # as setup.py

# ---------------------------------------------------------------------------------------------------------------
# Hardware constants (stated, not measured)
# ---------------------------------------------------------------------------------------------------------------

#: sm_90 per-SM limits used for occupancy.
SM90_LIMITS = dict(
    regs=65536, smem=228 * 1024, threads=2048, blocks=32, warps=64, reg_unit=256, smem_unit=128, smem_reserved=1024
)


@dataclasses.dataclass(frozen=True)
class Device:
    """An sm_90 part: SM count, boost clock, and per-SM issue rates in warp instructions per clock."""

    name: str
    sms: int
    clock_ghz: float
    hbm_tb_s: float
    rates: Tuple[Tuple[str, float], ...]


#: Per-SM throughput of each pipe in warp instructions / clock (CUDA C programming guide, cc 9.0 throughput
#: table divided by 32 lanes): FP32 128 lanes, FP64 64, MUFU 16, INT/ALU 64, conversions 16, LSU/MIO 32
#: (shared-memory wavefronts, shuffles), control 16; ``issue`` is one warp instruction per SM sub-partition
#: per clock.  ``tensor``: float64 mma only (DMMA.16x8x8 on sm_90, 1024 multiply-adds; DMMA.8x8x4, 256), its rate
#: in DMMA.8x8x4 units (:func:`mma_units`): the H100 SXM's FP64 tensor-core peak, 67 TFLOP/s = 128 multiply-adds
#: per SM and clock at 1.98 GHz, is 0.5 per SM and clock; the issue slots count instructions as for every pipe.
SM90_RATES = (
    ("issue", 4.0),
    ("fp32", 4.0),
    ("fp64", 2.0),
    ("mufu", 0.5),
    ("alu", 2.0),
    ("conv", 0.5),
    ("lsu", 1.0),
    ("uniform", 1.0),
    ("control", 0.5),
    ("tensor", 0.5),
)
H100_SXM = Device("H100 SXM", 132, 1.98, 3.35, SM90_RATES)
H200 = Device("H200", 132, 1.98, 4.8, SM90_RATES)
DEVICES = (H100_SXM, H200)
PIPES = ("fp32", "fp64", "mufu", "tensor", "alu", "conv", "lsu", "uniform", "control")

# ---------------------------------------------------------------------------------------------------------------
# SASS parsing, opcode classes, loops
# ---------------------------------------------------------------------------------------------------------------

_PIPE_OF = {
    # FP32 pipe (FMA-heavy/lite): arithmetic only; HFMA2.MMA is the compiler's constant move through that pipe.
    "FFMA": "fp32",
    "FADD": "fp32",
    "FMUL": "fp32",
    "FFMA32I": "fp32",
    "FADD32I": "fp32",
    "FMUL32I": "fp32",
    "HFMA2": "fp32",
    "HADD2": "fp32",
    "HMUL2": "fp32",
    "FSWZADD": "fp32",
    "DFMA": "fp64",
    "DADD": "fp64",
    "DMUL": "fp64",
    "DSETP": "fp64",
    "MUFU": "mufu",
    "HMMA": "tensor",
    "DMMA": "tensor",
    "IMMA": "tensor",
    "HGMMA": "tensor",
    "BMMA": "tensor",
    "QGMMA": "tensor",
    "F2F": "conv",
    "F2I": "conv",
    "I2F": "conv",
    "FRND": "conv",
    "I2I": "conv",
    "F2FP": "conv",
    "I2FP": "alu",
    "F2IP": "alu",
    "LDS": "lsu",
    "STS": "lsu",
    "LDG": "lsu",
    "STG": "lsu",
    "LDL": "lsu",
    "STL": "lsu",
    "LD": "lsu",
    "ST": "lsu",
    "LDSM": "lsu",
    "ATOM": "lsu",
    "ATOMS": "lsu",
    "ATOMG": "lsu",
    "RED": "lsu",
    "LDGSTS": "lsu",
    "SHFL": "lsu",
    "LDC": "lsu",
    "LDGDEPBAR": "lsu",
    "MATCH": "lsu",
    "REDUX": "lsu",
    "BRA": "control",
    "BRX": "control",
    "JMP": "control",
    "EXIT": "control",
    "RET": "control",
    "CALL": "control",
    "BAR": "control",
    "BSSY": "control",
    "BSYNC": "control",
    "WARPSYNC": "control",
    "NOP": "control",
    "BREAK": "control",
    "BPT": "control",
    "YIELD": "control",
    "DEPBAR": "control",
    "MEMBAR": "control",
    "ERRBAR": "control",
    "CCTL": "control",
    "KILL": "control",
    "NANOSLEEP": "control",
    "VOTE": "alu",
}
_MEMORY_PREFIXES = ("LD", "ST")  # LDS/LDG/LDL/STS/STG/STL and width suffixes are LSU


def mma_units(opcode: str) -> float:
    """Work of a tensor-core instruction in DMMA.8x8x4 units (256 multiply-adds): DMMA.16x8x8 is 4."""
    m = re.search(r"\.(\d+)x(\d+)x(\d+)", opcode)
    if not opcode.upper().startswith("DMMA") or not m:
        raise ValueError(f"{opcode}: only DMMA.MxNxK is modelled on the tensor pipe")
    a, b, c = (int(v) for v in m.groups())
    return a * b * c / 256.0


def classify(opcode: str) -> str:
    """Pipe of a SASS opcode (``FFMA``, ``LDS.128``, ``ISETP.GE.AND``, ...): one of :data:`PIPES`.

    FP32 arithmetic -> ``fp32``; DFMA/DADD/DMUL -> ``fp64``; MUFU -> ``mufu``; HMMA/DMMA/IMMA -> ``tensor``;
    conversions (F2F, I2F, ...) -> ``conv``; memory, shuffles, constant loads -> ``lsu``; branches, barriers,
    convergence (BSSY/BSYNC) -> ``control``; uniform-datapath ops (``U*``, ``R2UR``, ``S2UR``) -> ``uniform``;
    everything else (integer arithmetic, logic, compares, selects, FMNMX, FSETP, moves) -> ``alu``."""
    base = opcode.split(".")[0].upper()
    if not base:
        raise ValueError(f"empty SASS opcode {opcode!r}")
    if base in _PIPE_OF:
        return _PIPE_OF[base]
    if base in ("R2UR", "S2UR", "VOTEU") or (base.startswith("U") and base not in ("UNKNOWN",)):
        return "uniform"
    return "alu"


@dataclasses.dataclass
class Instr:
    """One SASS instruction: byte address, guard predicate (``""``, ``P0``, ``!P1``, ...), opcode, operands and,
    with ``nvdisasm -gi`` input, the source frames (innermost first) as (file basename, line) pairs."""

    addr: int
    pred: str
    opcode: str
    operands: str
    frames: Tuple[Tuple[str, int], ...] = ()

    @property
    def pipe(self) -> str:
        return classify(self.opcode)

    def branch_target(self, labels: Dict[str, int]) -> Optional[int]:
        """Target address of a BRA (hex address or ``.L_x_N`` label); None for other instructions."""
        if self.opcode.split(".")[0] != "BRA":
            return None
        m = re.search(r"\.L_x_\d+", self.operands)
        if m:
            if m.group(0) not in labels:
                raise ValueError(f"branch at {self.addr:#x} to unknown label {m.group(0)}")
            return labels[m.group(0)]
        m = re.search(r"0x([0-9a-fA-F]+)\s*$", self.operands.strip())
        if not m:
            raise ValueError(f"cannot read the target of {self.opcode} {self.operands!r} at {self.addr:#x}")
        return int(m.group(1), 16)


@dataclasses.dataclass
class Function:
    name: str
    instrs: List[Instr]
    labels: Dict[str, int]

    def index_of(self, addr: int) -> int:
        for i, ins in enumerate(self.instrs):
            if ins.addr == addr:
                return i
        raise ValueError(f"{self.name}: no instruction at {addr:#x}")


_FUNC_RE = re.compile(r"^\s*(?:Function\s*:\s*(\S+)|\.text\.(\S+?):)\s*$")
_INSTR_RE = re.compile(
    r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(?:\{\s*)?(@!?U?P[0-9T]\s+)?([A-Z0-9_]+(?:\.[0-9A-Za-z_]+)*)\s*([^;]*);"
)
_LABEL_RE = re.compile(r"^(\.L_x_\d+):")
_LINE_RE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')


def parse_sass(text: str) -> List[Function]:
    """Functions of a ``cuobjdump -sass`` or ``nvdisasm [-gi]`` listing, in order.

    With ``-gi`` line comments, each instruction gets the frames of the last comment block before it (nvdisasm
    prints the inlining chain innermost first, then the outermost line alone)."""
    funcs: List[Function] = []
    cur: Optional[Function] = None
    pending: List[Tuple[str, int]] = []
    frames: Tuple[Tuple[str, int], ...] = ()
    block_open = False
    for raw in text.splitlines():
        m = _FUNC_RE.match(raw)
        if m:
            cur = Function(m.group(1) or m.group(2), [], {})
            funcs.append(cur)
            pending, frames, block_open = [], (), False
            continue
        if cur is None:
            continue
        m = _LINE_RE.match(raw)
        if m:
            if not block_open:
                pending, block_open = [], True
            pending.append((os.path.basename(m.group(1)), int(m.group(2))))
            continue
        m = _LABEL_RE.match(raw.strip())
        if m:
            cur.labels[m.group(1)] = -1  # address filled by the next instruction
            continue
        m = _INSTR_RE.match(raw)
        if m:
            if block_open:
                frames, block_open = tuple(pending), False
            addr = int(m.group(1), 16)
            for lab, a in cur.labels.items():
                if a == -1:
                    cur.labels[lab] = addr
            pred = (m.group(2) or "").strip().lstrip("@")
            cur.instrs.append(Instr(addr, pred, m.group(3), m.group(4).strip(), frames))
    return [f for f in funcs if f.instrs]


@dataclasses.dataclass
class Loop:
    """A SASS loop: instructions ``[start, end]`` (indices), closed by the back-edge branch at ``end``."""

    start: int
    end: int
    parent: Optional[int] = None  # index of the innermost enclosing loop in the list of loops
    depth: int = 0

    def contains(self, other: "Loop") -> bool:
        return (
            self.start <= other.start and other.end <= self.end and (self.start, self.end) != (other.start, other.end)
        )


def main_body_end(fn: Function) -> int:
    """Index just past the first unpredicated EXIT (the end of the straight-line layout of the kernel)."""
    for i, ins in enumerate(fn.instrs):
        if ins.opcode == "EXIT" and not ins.pred:
            return i + 1
    return len(fn.instrs)


def find_loops(fn: Function) -> List[Loop]:
    """Loops of a function: every branch to an address at or before itself closes the range [target, branch].

    Only the main body counts (up to the first unconditional EXIT, :func:`main_body_end`): nvcc places the
    out-of-line slow paths after it (shuffle/convergence retries, division subroutines), and their branches
    back into the body are retries that converged warps never take.  Ranges sharing a header are merged
    (a ``continue`` gives two back-edges); the result is sorted by start
    with ``parent``/``depth`` set from containment.  Ranges that overlap without nesting are rejected (the
    nvcc output is structured; anything else means the model cannot apply)."""
    spans: Dict[int, int] = {}
    body_end = main_body_end(fn)
    for i, ins in enumerate(fn.instrs[:body_end]):
        t = ins.branch_target(fn.labels)
        if t is not None and t <= ins.addr:
            s = fn.index_of(t)
            spans[s] = max(spans.get(s, i), i)
    loops = [Loop(s, e) for s, e in sorted(spans.items())]
    for a in loops:
        for b in loops:
            if a is not b and a.start < b.start <= a.end < b.end:
                raise ValueError(f"{fn.name}: overlapping loops {a} and {b}")
    for i, lp in enumerate(loops):
        enclosing = [j for j, o in enumerate(loops) if o.contains(lp)]
        if enclosing:
            lp.parent = max(enclosing, key=lambda j: loops[j].start)
            lp.depth = len(enclosing)
    return loops


def pipe_counts(instrs: Sequence[Instr]) -> Dict[str, int]:
    """Instructions per pipe (every pipe of :data:`PIPES` present, zeros included)."""
    out = {p: 0 for p in PIPES}
    for ins in instrs:
        out[ins.pipe] += 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# Source regions (loop bodies, branch bodies) of the kernel, located by the text of their header
# ---------------------------------------------------------------------------------------------------------------


def _statement_end(text: str, pos: int) -> int:
    """Offset just past the statement starting at ``pos`` (a ``{...}`` block, or up to ``;`` at depth 0;
    nested ``for``/``if`` headers and ``#pragma`` lines are skipped)."""
    paren = 0
    i = pos
    while i < len(text):
        ch = text[i]
        if ch == "#" and (i == 0 or text[i - 1] == "\n" or text[:i].rstrip(" ").endswith("\n")):
            i = text.index("\n", i)
            continue
        if ch == "(":
            paren += 1
        elif ch == ")":
            paren -= 1
        elif ch == "{" and paren == 0:
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return j + 1
            raise ValueError("unbalanced braces in the kernel source")
        elif ch == ";" and paren == 0:
            return i + 1
        i += 1
    raise ValueError("statement without an end in the kernel source")


def _header_end(text: str, pos: int) -> int:
    """Offset just past the parenthesised header of the ``for``/``if`` at ``pos`` (``else``: past the word)."""
    if text.startswith("else", pos) and not text.startswith("else if", pos):
        return pos + 4
    i = text.index("(", pos)
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError("unbalanced parentheses in the kernel source")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def source_region(text: str, pattern: str, after: int = 0) -> Tuple[int, int, int]:
    """(header line, first body line, last body line) of the first ``for``/``if``/``else`` matching the regex
    ``pattern`` at or after character ``after``; raises ValueError naming the pattern when it is missing."""
    m = re.compile(pattern).search(text, after)
    if not m:
        raise ValueError(f"kernel source: no statement matches {pattern!r} (the trip model needs updating)")
    start = m.start()
    body = _header_end(text, start)
    end = _statement_end(text, body)
    return _line_of(text, start), _line_of(text, body), _line_of(text, end - 1)


# ---------------------------------------------------------------------------------------------------------------
# The configuration of one kernel launch, and the bandwidth scales (mirror of imq_make_bands in imq_math.h)
# ---------------------------------------------------------------------------------------------------------------

PAPER_SCALES = tuple(m * 10.0**e for e in range(-2, 3) for m in (1.0, 2.0, 5.0))
GROUP_MAX, GROUP_RATIO = 3, 1.0e4  # kImqGroupMax, kImqMaxGroupRatio of csrc/imq_math.h


def bandwidth_groups(bandwidths: Sequence[float]) -> Tuple[int, ...]:
    """Sizes of the consecutive groups (<= 3 bandwidths, max/min <= 1e4) sharing one power-of-two scale R."""
    sizes, s = [], 0
    while s < len(bandwidths):
        lo = hi = bandwidths[s]
        n = 1
        while n < GROUP_MAX and s + n < len(bandwidths):
            c = bandwidths[s + n]
            if max(hi, c) > GROUP_RATIO * min(lo, c):
                break
            lo, hi, n = min(lo, c), max(hi, c), n + 1
        sizes.append(n)
        s += n
    return tuple(sizes)


SCALE_RATIO = 2.0**40  # kImqMaxScaleRatio of csrc/imq_math.h


def bandwidth_scales(bandwidths: Sequence[float]) -> Tuple[int, ...]:
    """Sizes of the sets of bandwidths sharing one power-of-two scale R in the CUDA kernels (imq_make_bands):
    ``(S,)`` when max/min <= 2^40 (x formed once per pair), else ``(1,) * S`` (x per pair and bandwidth)."""
    if not bandwidths:
        raise ValueError("no bandwidths")
    if max(bandwidths) <= SCALE_RATIO * min(bandwidths):
        return (len(bandwidths),)
    return (1,) * len(bandwidths)


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch of ``imq_tiles_kernel<float, self_term, grad>``: rows ``n``, columns ``m`` (self: m == n),
    dimension ``d``, bandwidth scale sets (:func:`bandwidth_scales`), ``b_grad`` (column-side gradient work)."""

    op: str  # "cross-grad", "self-grad", "self-values", "cross-values"
    n: int
    m: int
    d: int
    scales: Tuple[int, ...]
    b_grad: bool = False
    tc: Optional[bool] = None  # the tensor-core route: None = where the host takes it (kTcMinD <= d <= 64)
    row_share: float = 1.0  # share of the tile pairs that load their row tile (row_tile_share of the plan)

    @property
    def bands(self) -> int:
        return sum(self.scales)

    @property
    def one_scale(self) -> bool:
        return len(self.scales) == 1

    @property
    def self_term(self) -> bool:
        return self.op.startswith("self")

    @property
    def grad(self) -> bool:
        return self.op.endswith("grad")

    @property
    def kernel(self) -> str:
        return f"imq_tiles_kernel<float, {str(self.self_term).lower()}, {str(self.grad).lower()}>"

    @property
    def pairs(self) -> int:
        return self.n * (self.n - 1) // 2 if self.self_term else self.n * self.m

    @property
    def tensor_cores(self) -> bool:
        """Whether the tile pairs take the tensor-core route: by default where the host launches the tensor-core
        instantiation (kTcMinD <= d <= 64, one chunk), and then for every tile pair: its error gate passes for
        data within ~250 standard deviations of a tile's first row at the paper's bandwidths (C_min = 2 d sigma^2
        0.01), i.e. for any batch of latent codes (a far outlier's tiles take the CUDA-core phases: ``tc=False``
        with the tensor-core kernel models that fallback)."""
        return (TC_MIN_D <= self.d <= DK_FLOAT) if self.tc is None else self.tc


def wae_cases(n: int, d: int, scales: Sequence[float] = PAPER_SCALES) -> Tuple[Case, ...]:
    """The three launches of ``fast_imq_mmd(x, y)`` fwd+bwd on the WAE path (x needs a gradient, the prior
    y does not, both (n, d)): self-grad of x, self values of y, cross-grad with x in the rows, no column side."""
    g = bandwidth_scales([2.0 * d * s for s in scales])
    return (
        Case("cross-grad", n, n, d, g, b_grad=False),
        Case("self-grad", n, n, d, g, b_grad=True),
        Case("self-values", n, n, d, g),
    )


# ---------------------------------------------------------------------------------------------------------------
# Trip-count model of imq_tiles_kernel: dynamic warp instructions of one 64 x 64 tile
# ---------------------------------------------------------------------------------------------------------------

KBT, KTHREADS, KWARPS, DK_FLOAT = 64, 256, 8, 64  # kBT, kThreads, kWarps, ChunkDims<float> of the .cuh
TC_MIN_D = 32  # kTcMinD of the .cuh
LANE_PARTS = 16  # kLaneParts<float> of the .cuh


def _chunks(d: int) -> List[int]:
    """Coordinates per shared-memory chunk (kc of the kernel) for dimension d."""
    return [min(DK_FLOAT, d - c) for c in range(0, d, DK_FLOAT)] or [0]


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """A source loop of the tile body: header regex, source trip counts of its executions in one tile (a
    function of the Case), and the marker (opcode prefix, count per source iteration) that gives the unroll
    factor of its SASS loop(s): u = (markers in the SASS loop) / count.  No marker: u = 1."""

    name: str
    pattern: str
    trips: object  # Callable[[Case], List[int]]
    marker: Optional[Tuple[str, int]] = None


@dataclasses.dataclass(frozen=True)
class RegionSpec:
    """A branch body of the tile loop (every match of the header regex) and the fraction of its enclosing
    executions, per warp, that enter it (uniform branches: 0 or 1;
    thread-index branches: the share of the 8 warps with an active lane)."""

    name: str
    pattern: str
    factor: object  # Callable[[Case], float]


def _edge_share(case: Case) -> float:
    """Share of the tiles that need per-pair masks: partial last tiles, self diagonal tiles (the WAE cases are
    2-D inputs, group 1: no other tile shares a group)."""
    ti, tj = -(-case.n // KBT), -(-case.m // KBT)
    if case.self_term:
        full = case.n // KBT
        interior = full * (full - 1) // 2
        return 1.0 - interior / (ti * (ti + 1) // 2)
    return 1.0 - (case.n // KBT) * (case.m // KBT) / (ti * tj)


def _slices(case: Case, n: int) -> float:
    """Share of the coordinate chunks whose G phase runs n slices of 16 coordinates (nl of the kernel)."""
    ch = _chunks(case.d)
    return sum(1 for k in ch if max(1, -(-k // 16)) == n) / len(ch)


def _g_warps(case: Case) -> float:
    """Share of the 8 warps that run the G phase of a chunk (threads tid / 16 < kc: half-warps per coordinate),
    averaged over the chunks."""
    ch = _chunks(case.d)
    return sum(math.ceil(min(16, k) / 2) / KWARPS for k in ch) / len(ch)


#: How often each source loop of the tile body runs per tile (per warp) -- see the module docstring.
TRIP_MODEL = (
    LoopSpec("chunk loop (D and G phases)", r"for \(int c = 0; c < nchunks; \+\+c\)", lambda c: [len(_chunks(c.d))]),
    LoopSpec(
        "load_chunk: tile coordinates -> shared",
        r"for \(int k = q; k < kcp; k \+= 4\)",
        lambda c: [-(-k // 4) for k in _chunks(c.d)],
        ("STS", 1),
    ),
    LoopSpec(
        "load_chunk: tile coordinates -> shared, 16-byte loads",
        r"for \(int k4 = 4 \* q; k4 < kcp; k4 \+= 16\)",
        lambda c: [-(-k // 16) for k in _chunks(c.d)],
        ("STS", 4),
    ),
    LoopSpec(
        "D: squared distances, one coordinate x 16 pairs",
        r"for \(int k = 0; k < kc; \+\+k\)",
        lambda c: _chunks(c.d),
        ("FFMA", 16),
    ),
    LoopSpec(
        "K: one bandwidth x 16 pairs", r"for \(int s = 0; s < S; \+\+s\)", lambda c: [c.bands], ("MUFU", 16)
    ),  # one MUFU.RCP per pair and bandwidth; the one-scale loop is unrolled twice, the per-band one not
    LoopSpec(
        "L: per-warp value partials -> float64", r"for \(int s = tid; s < 2 \* S; s \+= kThreads\) \{", lambda c: [1]
    ),
    LoopSpec(
        "L: lane partials of one value sum -> float64",
        r"for \(int w = 0; w < kWarps \* kLaneParts<T>; \+\+w\)",
        lambda c: [KWARPS * LANE_PARTS],
        ("LDS", 1),
    ),
    LoopSpec("L: row sums of P and w Phi", r"for \(int u = 0; u < kBT; \+\+u\)", lambda c: [KBT], ("LDS", 2)),
    LoopSpec("L: column sums of P and w Phi", r"for \(int i = 0; i < kBT; \+\+i\)", lambda c: [KBT], ("LDS", 2)),
    LoopSpec(
        "G: P times coordinates, 4 rows x 16 NL coordinates x 4 columns",
        r"for \(int u = 0; u < kBT; u \+= 4\)",
        lambda c: [KBT // 4] * len(_chunks(c.d)),
    ),  # #pragma unroll 1: u = 1 (NL = 1, 2 or 4 variants)
    LoopSpec(
        "TC gate: |row - c|^2 of one row, float64",
        r"for \(int q = 0; q < kc; \+\+q\)",
        lambda c: [c.d],
        ("DFMA", 1),
    ),
    LoopSpec(
        "TC D: 8 coordinates x 4 blocks of 16 x 8 pairs (float64 mma)",
        r"for \(int k0 = 0; k0 < kc; k0 \+= 8\)",
        lambda c: [-(-c.d // 8)],
        ("DMMA", 4),
    ),
    LoopSpec(
        "TC G: 8 partners x 4 blocks of 16 rows x 8 coordinates (float64 mma)",
        r"for \(int u0 = 0; u0 < kBT; u0 \+= 8\)",
        lambda c: [KBT // 8],
        ("DMMA", 4),
    ),
    LoopSpec("TC L: float64 line sums of P", r"for \(int v = 0; v < kBT; \+\+v\)", lambda c: [KBT], ("LDS", 1)),
)

#: Branch bodies inside the tile loop and the fraction of executions (per warp) that enter them.
REGION_MODEL = (
    RegionSpec("K: one scale for all bandwidths", r"if \(info\[0\]\)", lambda c: float(c.one_scale)),
    RegionSpec(
        "K: one scale per bandwidth",
        r"(?<=\}) else \{\n(?=\s+// One scale per bandwidth)",
        lambda c: float(not c.one_scale),
    ),
    RegionSpec(
        "value lanes 0 .. 2S-1",
        r"for \(int s = tid; s < 2 \* S; s \+= kThreads\) \{",
        lambda c: math.ceil(2 * c.bands / 32) / KWARPS,
    ),
    RegionSpec("G: warps holding a coordinate (tid / 16 < kc)", r"if \(\(tid >> 4\) < kc\)", lambda c: _g_warps(c)),
    RegionSpec("G column side (b_grad)", r"(?<!else )if \(A\.b_grad\)", lambda c: float(c.b_grad)),
    RegionSpec("G slices: one (chunk of <= 16 coordinates)", r"if \(nl <= 1\)", lambda c: _slices(c, 1)),
    RegionSpec("G slices: two (17 .. 32 coordinates)", r"else if \(nl == 2\)", lambda c: _slices(c, 2)),
    RegionSpec("G slices: all four (33 .. 64 coordinates)", r"else\s+g_side<", lambda c: _slices(c, 3) + _slices(c, 4)),
    RegionSpec("edge tiles: pair masks (partial, diagonal)", r"if \(edge_tile\)", lambda c: _edge_share(c)),
    RegionSpec("chunk reload (d > 64)", r"if \(nchunks > 1\)", lambda c: float(len(_chunks(c.d)) > 1)),
    RegionSpec("first chunk: weights and group indices", r"if \(c == 0\)", lambda c: 1.0 / len(_chunks(c.d))),
    RegionSpec("tensor-core route possible (32 <= d <= 64)", r"if \(tc_possible\)", lambda c: float(c.tensor_cores)),
    RegionSpec("TC distances", r"if \(tc\) tc_distances", lambda c: float(c.tensor_cores)),
    RegionSpec("CUDA-core D loop / G chunks (no tensor cores)", r"if \(!tc\)", lambda c: float(not c.tensor_cores)),
    RegionSpec(
        "TC: distances back from shared memory", r"if \(tc\) \{  // this thread", lambda c: float(c.tensor_cores)
    ),
    RegionSpec("TC: line sums of P", r"if \(tc\) \{\n\s+// Float64 line sums", lambda c: float(c.tensor_cores)),
    RegionSpec("TC gate: 128 <= tid < 192 (2 of 8 warps)", r"if \(tid >= 2 \* kBT && tid < 3 \* kBT\)", lambda c: 0.25),
    RegionSpec(
        "TC: 192 <= tid with b_grad (2 of 8 warps)",
        r"else if \(tid >= 3 \* kBT && A\.b_grad\)",
        lambda c: 0.25 * c.b_grad,
    ),
    RegionSpec(
        "TC gate: the column tile's rows (2 of 8 warps) and, for a new row tile, its rows (2 more)",
        r"if \(tid < 2 \* kBT && \(new_rows \|\| tid >= kBT\)\) tc_row_norm",
        lambda c: 0.25 + 0.25 * (c.row_share if len(_chunks(c.d)) == 1 else 1.0),
    ),
    RegionSpec(
        "TC G: warps with coordinates",
        r"if \(tc && 32 \* \(\(tid >> 5\) & 1\) < d\)",
        lambda c: float(c.tensor_cores) * (1.0 if c.d > 32 else 0.5),
    ),
    RegionSpec("16-byte tile loads (d % 4 == 0)", r"if \(A\.vec4\)", lambda c: float(c.d % 4 == 0)),
    RegionSpec(
        "4-byte tile loads (d % 4 != 0)", r"if \(!\(sizeof\(T\) == 4 && A\.vec4\)\)", lambda c: float(c.d % 4 != 0)
    ),
    RegionSpec(
        "row tile loads (first column tile of a row, one chunk)",
        r"if \(new_rows\) load_chunk",
        lambda c: c.row_share if len(_chunks(c.d)) == 1 else 1.0,
    ),
    RegionSpec(
        "row weights (tid < 64, first column tile of a row)",
        r"if \(tid < kBT && new_rows\)",
        lambda c: 0.25 * (c.row_share if len(_chunks(c.d)) == 1 else 1.0),
    ),
    RegionSpec("tid < 64 (2 of 8 warps)", r"if \(tid < kBT\)", lambda c: 0.25),
    RegionSpec("64 <= tid < 128 (2 of 8 warps)", r"else if \(tid < 2 \* kBT\)", lambda c: 0.25),
    RegionSpec("64 <= tid < 128 with b_grad", r"else if \(tid < 2 \* kBT && A\.b_grad\)", lambda c: 0.25 * c.b_grad),
)

PHASE_MARKERS = (
    ("D", "// ---- D phase ----"),
    ("K", "// ---- K phase ----"),
    ("L", "// ---- L phase ----"),
    ("G", "// ---- G phase ----"),
)


@dataclasses.dataclass
class TileCount:
    """Dynamic warp instructions of one 64 x 64 tile, averaged per warp: by pipe, by phase (D/K/L/G/other),
    plus the SASS loops found (name, u, executions per tile, static instructions, spill instructions)."""

    case: Case
    per_warp: Dict[str, float]
    per_phase: Dict[str, float]
    loops: List[dict]
    tensor_units: float = 0.0  # tensor-core work per warp in DMMA.8x8x4 units (256 multiply-adds each)

    @property
    def total(self) -> float:
        return sum(self.per_warp.values())

    def per_pair(self, pipe: Optional[str] = None) -> float:
        """Thread instructions per pair slot: 32 lanes x 8 warps x (per-warp count) / 4096 pairs."""
        v = self.total if pipe is None else self.per_warp[pipe]
        return v * KWARPS * 32 / (KBT * KBT)


def _kernel_frames(ins: Instr, kernel_file: str) -> List[int]:
    return [line for f, line in ins.frames if f == kernel_file]


def _outer_line(ins: Instr, kernel_file: str) -> Optional[int]:
    lines = _kernel_frames(ins, kernel_file)
    return lines[-1] if lines else None


class _Regions:
    """Branch bodies (line ranges) with their factors for one case; sibling bodies sharing a boundary line
    (``} else if (...) {``) give that line to the later one."""

    def __init__(self, text: str, case: Case):
        self.spans = []
        for spec in REGION_MODEL:
            _require_match(spec.pattern, text)
            for m in re.finditer(spec.pattern, text):
                _, first, last = source_region(text, spec.pattern, m.start())
                self.spans.append((first, last, float(spec.factor(case))))

    def factor(self, line: Optional[int], within: Tuple[int, int] = (0, 1 << 30)) -> float:
        """Product of the factors of the bodies holding ``line`` (only bodies inside the lines ``within``)."""
        if line is None:
            return 1.0
        inside = [s for s in self.spans if s[0] <= line <= s[1] and within[0] <= s[0] and s[1] <= within[1]]
        starts = {s[0] for s in inside}
        f = 1.0
        for first, last, fac in inside:
            if not (last == line and line in starts and first != line):
                f *= fac
        return f


def _call_sites(fn: Function, kernel_file: str, body: Tuple[int, int]) -> List[Optional[int]]:
    """Per instruction of ``fn``: the kernel-body line it belongs to (``_outer_line``).  nvdisasm gives some
    instructions of an inlined helper its line alone, without the "inlined at" chain; those inherit the call site
    of the instruction before them, so that the branch bodies and phases of the call site apply to them."""
    out: List[Optional[int]] = []
    last: Optional[int] = None
    for ins in fn.instrs:
        line = _outer_line(ins, kernel_file)
        if line is not None and body[0] <= line <= body[1]:
            last = line
        out.append(last if last is not None else line)
    return out


def _require_match(pattern: str, text: str) -> None:
    """Every pattern of the trip and region models must match the kernel source: a pattern that no longer
    matches (e.g. after reformatting) would silently give its loop or branch body a factor of 1."""
    if not re.search(pattern, text):
        raise ValueError(f"kernel source: no statement matches {pattern!r} (the trip model needs updating)")


def _phase_of(line: Optional[int], phase_lines: List[Tuple[int, str]]) -> str:
    name = "other"
    for start, ph in phase_lines:
        if line is not None and line >= start:
            name = ph
    return name


def tile_counts(fn: Function, case: Case, text: str, kernel_file: str = KERNEL_HEADER) -> TileCount:
    """Dynamic warp instructions per warp of one tile of ``fn`` (an ``imq_tiles_kernel`` disassembled with
    ``nvdisasm -gi``) for ``case``, by the trip model (:data:`TRIP_MODEL`, :data:`REGION_MODEL`).

    Weight of an instruction = executions per tile of the innermost SASS loop holding it (inside the tile
    loop; 1 in the tile body itself) x the factors of the branch bodies holding its source line.  A SASS loop
    is named by the source line of its back-edge; it runs sum_i floor(n_i / u) times per tile for source trip
    counts n_i and unroll factor u (markers in its body / markers per source iteration); iterations left over
    (n_i mod u) run in peeled copies outside the loop, weighted (sum_i n_i mod u) / copies.  Code of the tile
    kernel outside the tile loop (per block, not per tile) is not counted."""
    if not any(f == kernel_file for ins in fn.instrs for f, _ in ins.frames):
        raise ValueError(
            f"{fn.name}: no line information for {kernel_file} (compile with -lineinfo, disassemble with nvdisasm -gi)"
        )
    if case.tensor_cores and "ELb1EEEv" not in fn.name:
        raise ValueError(f"{fn.name}: the CUDA-core instantiation cannot take the tensor-core route (use tc=False)")
    loops = find_loops(fn)
    kernel = source_region(text, r"imq_tiles_kernel\(const TileArgs<T> A\)")
    outer = _call_sites(fn, kernel_file, (kernel[0], kernel[2]))
    j_line = source_region(text, r"for \(int J = J_begin")[0]
    tiles = [lp for lp in loops if _outer_line(fn.instrs[lp.end], kernel_file) == j_line]
    if len(tiles) != 1:
        raise ValueError(
            f"{fn.name}: expected one SASS loop closed at line {j_line} (the tile loop), found {len(tiles)}"
        )
    tile = tiles[0]
    regions = _Regions(text, case)
    phase_lines = sorted((_line_of(text, text.index(mk)), ph) for ph, mk in PHASE_MARKERS if mk in text)

    # Source loops: header line -> (spec, body first line, body last line).
    headers = {}
    for spec in TRIP_MODEL:
        _require_match(spec.pattern, text)
        for m in re.finditer(spec.pattern, text):
            head, first, last = source_region(text, spec.pattern, m.start())
            headers[head] = (spec, first, last)
    inner = [lp for lp in loops if tile.contains(lp)]
    by_source: Dict[int, List[Loop]] = {}
    for lp in inner:
        heads = [ln for ln in _kernel_frames(fn.instrs[lp.end], kernel_file) if ln in headers]
        if not heads:
            raise ValueError(
                f"{fn.name}: loop at {fn.instrs[lp.start].addr:#x} closes at source lines "
                f"{_kernel_frames(fn.instrs[lp.end], kernel_file)}, which the trip model does not "
                "know (update TRIP_MODEL)"
            )
        # One source loop per (header, call site): a helper's loop inlined twice is two loops.
        by_source.setdefault((heads[0], outer[lp.end]), []).append(lp)

    execs: Dict[int, float] = {}  # id(loop) -> body executions per tile
    peeled: Dict[int, float] = {}  # source header -> weight of its peeled copies
    info = []
    for (head, site), lps in by_source.items():
        spec, first, last = headers[head]
        trips = list(spec.trips(case))
        units = []
        for lp in lps:
            u = 1.0
            if spec.marker:
                op, per = spec.marker
                body = fn.instrs[lp.start : lp.end + 1]
                u = (
                    sum(
                        regions.factor(_outer_line(x, kernel_file), (first, last))
                        for x in body
                        if x.opcode.startswith(op)
                    )
                    / per
                )
                if u < 0.999 or abs(u - round(u)) > 1e-6:
                    raise ValueError(
                        f"{fn.name}: loop '{spec.name}' has {u:g} x {per} {op} markers, not a whole "
                        "multiple (the trip model does not fit this code)"
                    )
                u = float(round(u))
            units.append((u, lp))
        rest = trips
        for u, lp in sorted(units, key=lambda t: -t[0]):
            execs[id(lp)] = float(sum(n // int(u) for n in rest))
            rest = [n % int(u) for n in rest]
            eff = execs[id(lp)] * regions.factor(outer[lp.end])
            info.append(
                dict(
                    name=spec.name,
                    line=head,
                    u=int(u),
                    execs=eff,
                    static=lp.end - lp.start + 1,
                    spills=sum(1 for x in fn.instrs[lp.start : lp.end + 1] if x.opcode[:3] in ("LDL", "STL")),
                    addr=fn.instrs[lp.start].addr,
                )
            )
        if spec.marker and max(u for u, _ in units) > 1:
            op, per = spec.marker
            ids = {i for _, lp in units for i in range(lp.start, lp.end + 1)}
            # A helper's loop inlined at several call sites: only the copies inlined at this one.
            inlined = not (head <= site <= last)
            outside = [
                i
                for i in range(tile.start, tile.end + 1)
                if i not in ids
                and any(first <= ln <= last for ln in _kernel_frames(fn.instrs[i], kernel_file))
                and (not inlined or outer[i] == site)
            ]
            copies = sum(1 for i in outside if fn.instrs[i].opcode.startswith(op)) / per
            left = sum(rest)
            if left and not copies:
                raise ValueError(f"{fn.name}: loop '{spec.name}' leaves {left} iterations per tile that no code runs")
            if copies:
                for i in outside:
                    peeled[i] = left / copies

    per_warp = {p: 0.0 for p in PIPES}
    per_phase: Dict[str, float] = {}
    tensor_units = 0.0
    for i in range(tile.start, tile.end + 1):
        ins = fn.instrs[i]
        holders = [lp for lp in inner if lp.start <= i <= lp.end]
        w = execs[id(max(holders, key=lambda lp: lp.start))] if holders else 1.0
        if i in peeled:
            w = peeled[i]
        line = outer[i]
        w *= regions.factor(line)
        per_warp[ins.pipe] += w
        if ins.pipe == "tensor":
            tensor_units += w * mma_units(ins.opcode)
        ph = _phase_of(line, phase_lines)
        per_phase[ph] = per_phase.get(ph, 0.0) + w
    return TileCount(case, per_warp, per_phase, sorted(info, key=lambda r: r["addr"]), tensor_units)


# ---------------------------------------------------------------------------------------------------------------
# Toolchain, compilation and cache
# ---------------------------------------------------------------------------------------------------------------


def _find_tool(name: str) -> Optional[str]:
    """nvcc / cuobjdump / nvdisasm: $CUDA_HOME/bin, /usr/local/cuda/bin, PATH, then the copies Triton ships."""
    dirs = [os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs.append("/usr/local/cuda/bin")
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton  # noqa: F401  (only to locate its bundled CUDA binaries)

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    except ImportError:
        pass
    return None


def toolchain() -> Dict[str, str]:
    """Paths of nvcc, cuobjdump and nvdisasm; RuntimeError naming what is missing."""
    tools = {t: _find_tool(t) for t in ("nvcc", "cuobjdump", "nvdisasm")}
    missing = [t for t, p in tools.items() if p is None]
    if missing:
        raise RuntimeError(
            f"static model: {', '.join(missing)} not found (set CUDA_HOME or put the CUDA toolkit on PATH)"
        )
    return tools


def _run(cmd: Sequence[str], cwd: Optional[str] = None) -> str:
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def nvcc_flags() -> List[str]:
    """setup.py's nvcc flags plus torch's common nvcc flags (the defines the extension build passes)."""
    flags = list(SETUP_NVCC_FLAGS)
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        flags += [f for f in COMMON_NVCC_FLAGS if f not in flags]
    except ImportError:
        pass
    return flags + ["-std=c++17"]


def driver_source(text: str) -> str:
    """Translation unit that instantiates every kernel of the header (address taken = instantiated)."""
    kernels = [
        f"imq_tiles_kernel<{t}, {s}, {g}, {tc}>"
        for t in ("float", "double")
        for s in ("false", "true")
        for g in ("false", "true")
        for tc in (("false", "true") if t == "float" else ("false",))
    ]
    bounds = r"(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?"
    for name in re.findall(r"template <class T>\s*__global__\s+void\s+" + bounds + r"(\w+)\s*\(", text):
        if name != "imq_tiles_kernel":
            kernels += [f"{name}<float>", f"{name}<double>"]
    refs = ",\n    ".join(f"reinterpret_cast<const void*>(&{k})" for k in kernels)
    return (
        f"// Generated by benchmarks/static_model.py: every kernel of {KERNEL_HEADER}, for SASS inspection.\n"
        f'#include "{KERNEL_HEADER}"\nusing namespace gmwae_fast::imq_cuda;\n'
        f"const void* gmwae_static_model_kernels[] = {{\n    {refs}}};\n"
    )


PLAN_SOURCE = r"""// Generated by benchmarks/static_model.py: prints the launch plan of the tile kernel.
#include <cstdio>
#include <cstdlib>
#include "imq_mmd_cuda_kernels.cuh"
using namespace gmwae_fast::imq_cuda;
int main(int argc, char** argv) {
  if (argc != 8) return 2;  // self grad N M d S sms
  const bool self = atoi(argv[1]), grad = atoi(argv[2]);
  const int sms = atoi(argv[7]);
  (void)sms;
  TileArgs<float> A{};
  A.N = atoll(argv[3]); A.M = atoll(argv[4]); A.d = atoll(argv[5]); A.S = atoi(argv[6]); A.group = 1;
  (void)PLAN_CALL;
  printf("{\"TI\": %d, \"TJ\": %d, \"PI\": %d, \"PJ\": %d, \"PSI\": %d, \"PSJ\": %d, \"smem\": %zu}\n",
         A.TI, A.TJ, A.PI, A.PJ, A.PSI, A.PSJ,
         smem_layout<float>(A.S, grad, tensor_core_route(A.d, sizeof(float), true)).bytes);
  return 0;
}
"""


@dataclasses.dataclass
class Build:
    """A cached sm_XX build: folder, SASS with line info, ptxas -v log, cuobjdump -res-usage, plan program."""

    folder: str
    text: str
    sass: str
    ptxas_log: str
    res_usage: str
    plan_exe: Optional[str]
    plan_error: Optional[str]
    cached: bool


def _cache_key(arch: int, tools: Dict[str, str], flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(CSRC)):
        if name.endswith((".h", ".cuh")):
            with open(os.path.join(CSRC, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(_run([tools["nvcc"], "--version"]).encode())
    h.update(" ".join(flags).encode() + str(arch).encode() + PLAN_SOURCE.encode())
    with open(os.path.join(CSRC, KERNEL_HEADER)) as f:  # the generated sources
        h.update(driver_source(f.read()).encode())
    return h.hexdigest()[:16]


def compile_cuda(arch: int = 90, force: bool = False) -> Build:
    """Compile (or reuse from ``build/static_model/``) every CUDA kernel for sm_``arch``."""
    tools = toolchain()
    flags = nvcc_flags()
    folder = os.path.join(CACHE_DIR, f"sm{arch}-{_cache_key(arch, tools, flags)}")
    done = os.path.join(folder, "done")
    cached = os.path.exists(done) and not force
    if not cached:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(CSRC, KERNEL_HEADER)) as f:
            text = f.read()
        _write(folder, KERNEL_HEADER, text)  # the source the SASS line numbers refer to
        with open(os.path.join(folder, "kernels.cu"), "w") as f:
            f.write(driver_source(text))
        log = _run(
            [
                tools["nvcc"],
                "-cubin",
                f"-arch=sm_{arch}",
                "-lineinfo",
                "-Xptxas",
                "-v",
                *flags,
                "-I",
                CSRC,
                "kernels.cu",
                "-o",
                "kernels.cubin",
            ],
            cwd=folder,
        )
        _write(folder, "ptxas.log", log)
        _write(folder, "kernels.sass", _run([tools["nvdisasm"], "-gi", "-c", "kernels.cubin"], cwd=folder))
        _write(folder, "res_usage.txt", _run([tools["cuobjdump"], "-res-usage", "kernels.cubin"], cwd=folder))
        _write(folder, "plan_error.txt", _build_plan(tools, flags, arch, folder))
        _write(folder, "done", "")
    read = lambda n: open(os.path.join(folder, n)).read()  # noqa: E731
    plan = os.path.join(folder, "plan")
    return Build(
        folder,
        read(KERNEL_HEADER),
        read("kernels.sass"),
        read("ptxas.log"),
        read("res_usage.txt"),
        plan if os.path.exists(plan) else None,
        read("plan_error.txt") or None,
        cached,
    )


def _build_plan(tools: Dict[str, str], flags: Sequence[str], arch: int, folder: str) -> str:
    """Build the plan program against either signature of plan_tiles; returns "" or the last error."""
    err = ""
    for call in ("plan_tiles(A, self, grad)", "plan_tiles(A, self, grad, sms)"):
        _write(folder, "plan.cu", PLAN_SOURCE.replace("PLAN_CALL", call))
        try:
            _run([tools["nvcc"], f"-arch=sm_{arch}", *flags, "-I", CSRC, "plan.cu", "-o", "plan"], cwd=folder)
            return ""
        except RuntimeError as exc:
            err = str(exc)[-2000:]
    return err


def _write(folder: str, name: str, content: str) -> None:
    with open(os.path.join(folder, name), "w") as f:
        f.write(content)


# ---------------------------------------------------------------------------------------------------------------
# Resources, occupancy, time prediction
# ---------------------------------------------------------------------------------------------------------------


def resources(build: Build) -> Dict[str, dict]:
    """Per mangled kernel name: registers, spill stores/loads (bytes), stack, static shared memory."""
    out: Dict[str, dict] = {}
    cur = None
    for line in build.ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = out.setdefault(m.group(1), {})
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            cur["regs"] = int(m.group(1))
    for name, shared in re.findall(r"Function (\S+):\s*\n\s*REG:\d+ STACK:\d+ SHARED:(\d+)", build.res_usage):
        out.setdefault(name, {})["static_smem"] = int(shared)
    return out


def occupancy(regs: int, smem: int, threads: int, lim: dict = SM90_LIMITS) -> Tuple[int, float, str]:
    """(blocks per SM, warp occupancy, limiting resource) from registers/thread, shared bytes/block, threads."""
    warps = math.ceil(threads / 32)
    regs_warp = math.ceil(regs * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by = {
        "registers": (lim["regs"] // regs_warp) // warps if regs else lim["blocks"],
        "shared memory": lim["smem"] // (math.ceil(smem / lim["smem_unit"]) * lim["smem_unit"] + lim["smem_reserved"]),
        "threads": lim["threads"] // threads,
        "blocks": lim["blocks"],
    }
    limiter = min(by, key=by.get)
    return by[limiter], by[limiter] * warps / lim["warps"], limiter


def plan(build: Build, case: Case, sms: int) -> Optional[dict]:
    """The host plan of ``case`` (TI, TJ, PI, PJ, PSI, PSJ, smem) from the cached plan program, or None."""
    if not build.plan_exe:
        return None
    out = _run(
        [
            build.plan_exe,
            str(int(case.self_term)),
            str(int(case.grad)),
            str(case.n),
            str(case.m),
            str(case.d),
            str(case.bands),
            str(sms),
        ]
    )
    return json.loads(out)


def block_tiles(p: dict, self_term: bool) -> List[int]:
    """Tiles of every block: panel pair (p, q), self terms the upper triangle of tiles (p <= q, J >= I)."""
    out = []
    for pi in range(p["PI"]):
        ni = min(p["PSI"], p["TI"] - pi * p["PSI"])
        for qi in range(pi if self_term else 0, p["PJ"]):
            nj = min(p["PSJ"], p["TJ"] - qi * p["PSJ"])
            out.append(ni * (ni + 1) // 2 if (self_term and pi == qi) else ni * nj)
    return out


def row_tile_share(p: dict, self_term: bool) -> float:
    """Share of the tile pairs that load their row tile (the first column tile of each row of a block; one
    coordinate chunk: the row tile then stays in shared memory for the block's other column tiles of that row)."""
    rows = sum(
        min(p["PSI"], p["TI"] - pi * p["PSI"]) for pi in range(p["PI"]) for _ in range(pi if self_term else 0, p["PJ"])
    )
    return rows / sum(block_tiles(p, self_term))


def busiest_sm_tiles(tiles: Sequence[int], sms: int) -> int:
    """Tiles of the busiest SM when blocks go, in order, to the SM with the least work (dynamic dispatch)."""
    load = [0] * sms
    for t in tiles:
        k = min(range(sms), key=load.__getitem__)
        load[k] += t
    return max(load)


def predict(tc: TileCount, dev: Device, tiles_busiest: int) -> Dict[str, float]:
    """Issue-bound time of one launch: cycles per tile = max over pipes (warp instructions of the tile on
    that pipe / the pipe's per-SM rate), issue included (all instructions / 4); time = busiest SM's tiles x
    cycles per tile / clock.  Returns the seconds and the binding pipe's cycles per pipe."""
    rates = dict(dev.rates)
    warp_instr = {p: v * KWARPS for p, v in tc.per_warp.items()}
    cycles = {p: warp_instr[p] / rates[p] for p in PIPES if warp_instr[p]}
    if warp_instr["tensor"]:  # the tensor pipe's rate is per DMMA.8x8x4 of work
        cycles["tensor"] = tc.tensor_units * KWARPS / rates["tensor"]
    cycles["issue"] = sum(warp_instr.values()) / rates["issue"]
    bound = max(cycles, key=cycles.get)
    seconds = tiles_busiest * cycles[bound] / (dev.clock_ghz * 1e9)
    return dict(
        seconds=seconds, bound=bound, cycles_per_tile=cycles[bound], **{f"cyc_{k}": v for k, v in cycles.items()}
    )


def mufu_floor(case: Case, dev: Device) -> float:
    """Seconds if only the reciprocals counted: one MUFU.RCP per pair and bandwidth (imq_band_acc) at 16 / SM /
    clock."""
    return case.pairs * case.bands / (16 * dev.sms * dev.clock_ghz * 1e9)


#: Fewest FP32-pipe thread instructions per pair and bandwidth in the K phase: c_s + x (FADD), the value sum
#: (FFMA) and, with a gradient, the sum of the gradient weights (FFMA).  The reciprocal itself is one MUFU.
K_FLOOR_FP32 = {True: 3, False: 2}


def contract_floor(case: Case) -> Dict[str, float]:
    """Fewest thread instructions per pair any CUDA-core kernel needs under the accuracy contract (every
    difference a_ik - b_jk formed from the inputs, no |a|^2 + |b|^2 - 2ab expansion): per coordinate one FADD
    for the difference (formed once and kept for the gradient sides) and one FFMA for the distance, one FFMA per
    gradient side (P_ij times the kept difference: rows, and columns when ``b_grad``); per bandwidth
    :data:`K_FLOOR_FP32` FP32 and one MUFU.RCP.  Nothing else: no loads, shuffles, index math or reductions."""
    sides = (1 + int(case.b_grad)) if case.grad else 0
    fp32 = (2 + sides) * case.d + case.bands * K_FLOOR_FP32[case.grad]
    return dict(fp32=float(fp32), mufu=float(case.bands), issue=float(fp32 + case.bands))


def floor_seconds(n: int, d: int, dev: Device = H100_SXM) -> float:
    """Seconds of :func:`contract_floor` over the WAE path's three launches with every issue slot of every SM
    busy (no wave tail): thread instructions / (32 lanes x issue rate x SMs x clock).  The FP32 pipe's rate
    equals the issue rate on sm_90, so the issue bound is the binding one."""
    instr = sum(case.pairs * contract_floor(case)["issue"] for case in wae_cases(n, d))
    return instr / (32 * dict(dev.rates)["issue"] * dev.sms * dev.clock_ghz * 1e9)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

GOALS = ((4096, 64, 0.3e-3), (65536, 10, 60e-3))  # (n, d, seconds): fwd+bwd on the WAE path, H100
ISSUE_COUNTS = {
    64: {"cross-grad": 578, "self-grad": 703, "self-values": 398},
    10: {"cross-grad": 450, "self-grad": 575, "self-values": 270},
}
KEY_CONFIGS = ((4096, 64), (4096, 10), (65536, 10))


def tile_function(
    fns: Sequence[Function], self_term: bool, grad: bool, dtype: str = "f", tensor_cores: bool = False
) -> Function:
    """The disassembled ``imq_tiles_kernel<float|double, self_term, grad, tensor_cores>``."""
    tag = f"imq_tiles_kernelI{dtype}Lb{int(self_term)}ELb{int(grad)}ELb{int(tensor_cores)}E"
    hits = [f for f in fns if tag in f.name]
    if len(hits) != 1:
        raise ValueError(f"expected one SASS function matching {tag}, found {len(hits)}")
    return hits[0]


def _demangle(name: str) -> str:
    m = re.search(r"\d(imq_[a-z_]+?_kernel)I([fd])(?:Lb(\d)ELb(\d)ELb(\d)E)?", name)
    if not m:
        return name
    t = "float" if m.group(2) == "f" else "double"
    if m.group(3) is None:
        return f"{m.group(1)}<{t}>"
    flag = lambda g: "true" if g == "1" else "false"  # noqa: E731
    return f"{m.group(1)}<{t}, {', '.join(flag(m.group(i)) for i in (3, 4, 5))}>"


def analyse(build: Build, dev: Device = H100_SXM) -> dict:
    """Everything the report shows: resources per kernel, per-case tile counts and predicted times."""
    fns = parse_sass(build.sass)
    res = resources(build)
    kernels = []
    for name, r in sorted(res.items(), key=lambda kv: _demangle(kv[0])):
        smem = r.get("static_smem", 0)
        dyn = None
        if "tiles" in name:
            flags = re.search(r"Lb(\d)ELb(\d)ELb(\d)E", name)
            grad, tc_kernel = flags.group(2) == "1", flags.group(3) == "1"
            d = 64 if tc_kernel else 10  # the dynamic shared memory depends on d only through the route
            c = Case("self-grad" if grad else "self-values", 4096, 4096, d, bandwidth_scales(PAPER_SCALES))
            p = plan(build, c, dev.sms)
            dyn = p["smem"] if p and "If" in name else None
        blocks, occ, lim = occupancy(r.get("regs", 0), smem + (dyn or 0), KTHREADS if "tiles" in name else 256)
        kernels.append(
            dict(kernel=_demangle(name), dyn_smem=dyn, blocks_per_sm=blocks, occupancy=occ, limiter=lim, **r)
        )
    configs = []
    for n, d in KEY_CONFIGS:
        rows = []
        for case in wae_cases(n, d):
            fn = tile_function(fns, case.self_term, case.grad, tensor_cores=case.tensor_cores)
            p = plan(build, case, dev.sms)
            if p:
                case = dataclasses.replace(case, row_share=row_tile_share(p, case.self_term))
            tc = tile_counts(fn, case, build.text)
            tiles = block_tiles(p, case.self_term) if p else None
            total = (
                sum(tiles)
                if tiles
                else (math.ceil(n / KBT) * (math.ceil(n / KBT) + 1) // 2 if case.self_term else math.ceil(n / KBT) ** 2)
            )
            busiest = busiest_sm_tiles(tiles, dev.sms) if tiles else math.ceil(total / dev.sms)
            rows.append(
                dict(
                    case=case,
                    tc=tc,
                    tiles=total,
                    blocks=len(tiles) if tiles else None,
                    busiest=busiest,
                    times={dv.name: predict(tc, dv, busiest) for dv in DEVICES},
                    mufu={dv.name: mufu_floor(case, dv) for dv in DEVICES},
                )
            )
        configs.append(dict(n=n, d=d, rows=rows))
    return dict(kernels=kernels, configs=configs)


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f}"


def render(a: dict, build: Build, triton: Optional[List[dict]], triton_note: str) -> str:
    """The markdown report (``benchmarks/results/sm90-static.md``)."""
    L = [
        "# sm_90 static performance model of the CUDA MMD kernels",
        "",
        f"**Predictions from the compiled SASS; no GPU ran anything.** Produced on {datetime.date.today()} by "
        "`.venv/bin/python benchmarks/static_model.py` on a 2-core CPU VM without a GPU "
        f"(nvcc: `{_nvcc_version()}`; build folder `{os.path.relpath(build.folder, ROOT)}`).",
        "",
        "Method (details in the module docstring of `benchmarks/static_model.py`): the tile kernel is compiled for "
        "sm_90 with setup.py's flags and `-lineinfo`, disassembled with `nvdisasm -gi`, its loops found from "
        "back-edges and named by source line, and the dynamic warp instructions of one 64 x 64 tile counted with "
        "the trip-count model (source trip counts / SASS unroll factor, branch bodies weighted by the share of "
        "warps entering them). *Per pair* = 32 x 8 warps x (per-warp count) / 4096 pair slots "
        "of a tile. Time = busiest SM's tiles x max over pipes (warp instructions / per-SM pipe rate, issue "
        "4/clk included) / clock. Devices: "
        + "; ".join(f"{d.name}: {d.sms} SMs, {d.clock_ghz} GHz" for d in DEVICES)
        + ". Per-SM rates (warp instr/clk): "
        + ", ".join(f"{k} {v:g}" for k, v in SM90_RATES)
        + ".",
        "",
        "Caveat: an issue-bound model assumes enough warps to hide latency. These kernels run 2 blocks x 8 "
        "warps per SM (25% occupancy, register-limited), i.e. 4 warps per scheduler for FFMA chains with a "
        "4-cycle latency and shared-memory loads of ~30 cycles; the real time is this bound or more. Finalize "
        "kernels, launch overheads and the Python-side work are not included.",
        "",
    ]
    L += [
        "## Kernels: registers, spills, shared memory, occupancy",
        "",
        "| kernel | regs | spill st/ld (B) | stack (B) | static smem (B) | dynamic smem (B, S=15) | blocks/SM | "
        "occupancy | limited by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in a["kernels"]:
        L.append(
            f"| `{k['kernel']}` | {k.get('regs', '?')} | {k.get('spill_stores', '?')}/{k.get('spill_loads', '?')} "
            f"| {k.get('stack', '?')} | {k.get('static_smem', '?')} | {k['dyn_smem'] if k['dyn_smem'] else '-'} "
            f"| {k['blocks_per_sm']} | {k['occupancy']:.0%} | {k['limiter']} |"
        )
    L += [
        "",
        "Dynamic shared memory of the double kernels depends on S as well; not listed. Occupancy "
        "limits: 65536 registers, 228 KiB shared memory (+1 KiB reserved per block), 2048 threads, 32 blocks "
        "per SM.",
        "",
    ]
    L += _render_counts(a) + _render_times(a) + _render_costs(a) + _render_loops(a)
    L += ["## Triton kernels", "", triton_note, ""]
    if triton:
        L += [
            "| kernel | family | variant | warps | regs | spill st/ld (B) | smem (B) | blocks/SM | occupancy |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for t in triton:
            threads = 32 * int(t.get("num_warps") or 4)
            regs, smem = int(t.get("regs") or 0), int(t.get("smem") or 0)
            blocks, occ, _ = occupancy(regs, smem, threads)
            L.append(
                f"| `{t.get('name', '?')}` | {t.get('family', '')} | {t.get('variant', '')} | "
                f"{t.get('num_warps', '?')} | {regs or '?'} | {t.get('spill_stores', '?')}/"
                f"{t.get('spill_loads', '?')} | {smem} | {blocks} | {occ:.0%} |"
            )
        L.append("")
    return "\n".join(L) + "\n"


def _nvcc_version() -> str:
    try:
        out = _run([toolchain()["nvcc"], "--version"])
        return re.findall(r"release [^\n]*", out)[-1]
    except (RuntimeError, IndexError):
        return "unknown"


def _render_counts(a: dict) -> List[str]:
    L = [
        "## Dynamic instructions per pair (WAE path, S = 15 bandwidths sharing one scale)",
        "",
        "Thread instructions per pair slot of a tile (self kernels: upper-triangle tiles, diagonal tiles "
        "included), by pipe and by phase (D distances, K kernel values / phi / psi, L line sums, G gradients).",
        "",
        "| n | d | op | total | issue's count | fp32 | alu | lsu | control | mufu | other pipes | D | K | L | G | "
        "tile overhead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cfg in a["configs"]:
        for r in cfg["rows"]:
            tc, op = r["tc"], r["case"].op
            pp = {k: tc.per_pair(k) for k in PIPES}
            rest = sum(v for k, v in pp.items() if k not in ("fp32", "alu", "lsu", "control", "mufu"))
            ph = {k: v * KWARPS * 32 / (KBT * KBT) for k, v in tc.per_phase.items()}
            L.append(
                f"| {cfg['n']} | {cfg['d']} | {op} | {tc.per_pair():.0f} | "
                f"{ISSUE_COUNTS.get(cfg['d'], {}).get(op, '-')} | {pp['fp32']:.0f} | {pp['alu']:.0f} | "
                f"{pp['lsu']:.0f} | {pp['control']:.0f} | {pp['mufu']:.1f} | {rest:.0f} | "
                + " | ".join(f"{ph.get(k, 0):.0f}" for k in ("D", "K", "L", "G", "other"))
                + " |"
            )
    return L + [""]


def _render_times(a: dict) -> List[str]:
    L = [
        "## Predicted times (fwd+bwd, WAE path: self-grad of x, self values of y, cross-grad without column side)",
        "",
        "| n | d | op | tiles | blocks | busiest SM tiles | bound | H100 SXM (ms) | H200 (ms) | MUFU floor (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cfg in a["configs"]:
        tot = {d.name: 0.0 for d in DEVICES}
        mu = 0.0
        for r in cfg["rows"]:
            t = r["times"]
            for d in DEVICES:
                tot[d.name] += t[d.name]["seconds"]
            mu += r["mufu"][H100_SXM.name]
            L.append(
                f"| {cfg['n']} | {cfg['d']} | {r['case'].op} | {r['tiles']} | {r['blocks'] or '?'} | "
                f"{r['busiest']} | {t[H100_SXM.name]['bound']} | {_ms(t[H100_SXM.name]['seconds'])} | "
                f"{_ms(t[H200.name]['seconds'])} | {_ms(r['mufu'][H100_SXM.name])} |"
            )
        L.append(
            f"| {cfg['n']} | {cfg['d']} | **total** | | | | | **{_ms(tot[H100_SXM.name])}** | "
            f"**{_ms(tot[H200.name])}** | {_ms(mu)} |"
        )
        cfg["total"] = tot[H100_SXM.name]
    L += [
        "",
        "H200 has the same SM count and clock as the H100 SXM, so the issue-bound prediction is the same "
        "(its larger HBM bandwidth only helps the memory-bound finalize kernels, not modelled).",
        "",
        "### Against the goals and the issue's estimate",
        "",
    ]
    for n, d, goal in GOALS:
        got = [c for c in a["configs"] if c["n"] == n and c["d"] == d]
        if got:
            t = got[0]["total"]
            L.append(
                f"* n = {n}, d = {d}, fwd+bwd: predicted {_ms(t)} ms on an H100 SXM against the goal "
                f"{_ms(goal)} ms: **{'met' if t <= goal else 'NOT met'}** ({t / goal:.3f}x the goal)."
            )
    L += [
        "* The issue's estimate from a hand count of an earlier SASS: 578 / 703 / 398 instructions per pair "
        "(d = 64) and 450 / 575 / 270 (d = 10), ~0.6-0.8 ms and ~120-160 ms; the table above is the count of "
        "the current sources.",
        "",
    ]
    return L


def _phase_share(cfg: dict) -> Dict[str, float]:
    """Warp instructions per phase summed over the three launches (tiles x per-tile count)."""
    out: Dict[str, float] = {}
    for r in cfg["rows"]:
        for ph, v in r["tc"].per_phase.items():
            out[ph] = out.get(ph, 0.0) + v * r["tiles"]
    return out


def _render_costs(a: dict) -> List[str]:
    """Ranked list of the largest costs, with the figures behind each."""
    L = ["## Largest costs, ranked (optimisation list)", ""]
    for cfg in a["configs"]:
        sh = _phase_share(cfg)
        tot = sum(sh.values())
        L.append(
            f"* n = {cfg['n']}, d = {cfg['d']}: share of all issued instructions: "
            + ", ".join(f"{k} {v / tot:.0%}" for k, v in sorted(sh.items(), key=lambda kv: -kv[1]))
            + "."
        )
    big = {(c["n"], c["d"]): c for c in a["configs"]}
    c64, c10 = big.get((4096, 64)), big.get((4096, 10))
    if c64 and c10:
        k = c64["rows"][0]["tc"].per_phase.get("K", 0) * KWARPS * 32 / (KBT * KBT)
        g64 = c64["rows"][1]["tc"].per_phase.get("G", 0) * KWARPS * 32 / (KBT * KBT)
        d64 = c64["rows"][2]["tc"].per_phase.get("D", 0) * KWARPS * 32 / (KBT * KBT)
        d10 = c10["rows"][2]["tc"].per_phase.get("D", 0) * KWARPS * 32 / (KBT * KBT)
        L += [
            "",
            f"1. **Per-bandwidth arithmetic (K phase)**: {k:.0f} instructions per pair for 15 bandwidths "
            f"({k / 15:.1f} per bandwidth) in cross-grad at d = 64: per pair and bandwidth c_s + x, one bare "
            "MUFU.RCP (rcp.approx, no Newton step: imq_band_acc), the value sums w r and (w x) r, phi and psi "
            "(6 FP32), x, its cap and w x once per pair (one power-of-two scale for all bandwidths), one shuffle "
            "level per value partial and bandwidth (16 lane partials per warp in shared memory), the band loop "
            "unrolled twice in the gradient kernels. The largest cost at every size now; its floor is 7 per "
            "bandwidth and pair (6 FP32 + MUFU).",
            f"2. **Point gradients (G phase)**: {g64:.0f} instructions per pair in self-grad at d = 64 (row and "
            "column sides) on the tensor-core route: per side a 64 x 64 x 64 float64 GEMM (8 steps of 4 "
            "DMMA.16x8x8 per warp) whose operands are converted and centred on the fly (F2F + DADD per fragment "
            "element; the compiler pads the DMMAs with NOPs where no independent instruction is left), then an "
            "epilogue of 16 outputs per lane (a'_i sum_j P_ij - (P B')_i, slot update). At d = 10 (CUDA cores, "
            "g_side): FADD + FFMA per (pair, coordinate), only the ceil(kc / 16) slices a chunk holds.",
            f"3. **Squared distances (D phase)**: {d64:.0f} per pair at d = 64 ({d10:.0f} at d = 10): at d = 64 "
            "the error gate (float64 norms of the 128 rows from the centre; the row tile's only when it changes), "
            "the float64 GEMM (8 steps of 4 DMMA.16x8x8 per warp) and its epilogue to shared memory; at d = 10 "
            "FADD + FFMA per coordinate plus 2 LDS.128 per 16 pairs.",
            "4. **Tile overheads (L phase, loads)**: line sums of P/Phi run on 2-4 of 8 warps (the tensor-core "
            "route adds float64 line sums of P on two more); tile loads are 16-byte when d % 4 == 0, and the row "
            "tile stays in shared memory across a row's column tiles when d fits one chunk.",
            "5. **Latency hiding**: 128 registers (the __launch_bounds__(256, 2) cap) give 2 blocks = 16 "
            "warps per SM (25% occupancy); the issue-bound times above assume the FFMA chains, DMMAs and shared "
            "loads are hidden, which 4 warps per scheduler may not do. Spills (ptxas: see the kernel table) are "
            "outside the per-pair loops (tests/test_static_model.py checks it).",
        ]
        L += _render_d64_need(c64)
    return L + [""]


def _render_d64_need(cfg: dict) -> List[str]:
    """What the d = 64 goal needs of the D and G phases, by the same model (their instructions scaled down, the
    rest as counted)."""
    goal = [g for n, d, g in GOALS if (n, d) == (cfg["n"], cfg["d"])]
    if not goal:
        return []
    t_dg = t_rest = 0.0
    for r in cfg["rows"]:
        ph = r["tc"].per_phase
        share = (ph.get("D", 0.0) + ph.get("G", 0.0)) / sum(ph.values())
        t = r["times"][H100_SXM.name]["seconds"]
        t_dg += share * t
        t_rest += (1.0 - share) * t
    need = (goal[0] - t_rest) / t_dg if t_dg else float("inf")
    pred = t_dg + t_rest
    verdict = "met" if pred <= goal[0] else f"not met; D + G would need <= {need:.0%} of their instructions"
    return [
        f"6. **n = {cfg['n']}, d = {cfg['d']} against {_ms(goal[0])} ms**: predicted {_ms(pred)} ms ({verdict}); "
        f"the D and G phases take {_ms(t_dg)} ms of it on the tensor-core route, the rest (K, L, tile overheads) "
        f"{_ms(t_rest)} ms, so the K phase is now the lever. The route's accuracy: float64 GEMMs on centred tiles "
        "behind a per-tile-pair error gate (docs/ARCHITECTURE.md), checked under the SIMT emulator with models of "
        "both mma shapes (csrc/testing/cuda_emu.h); the instructions themselves have not run on a GPU.",
        *_render_floor(cfg["n"], cfg["d"], goal[0], pred),
    ]


def _render_floor(n: int, d: int, goal: float, predicted: float) -> List[str]:
    """Item 7: the contract's floor on CUDA cores (:func:`floor_seconds`) against the goal and the prediction."""
    fl = floor_seconds(n, d)
    per = {c.op: contract_floor(c)["issue"] for c in wae_cases(n, d)}
    return [
        f"7. **The accuracy contract's floor on CUDA cores** (n = {n}, d = {d}): even a CUDA-core kernel that "
        "issued nothing but the arithmetic the contract requires (per coordinate: FADD for the difference, FFMA "
        "for the distance, one FFMA per gradient side reusing the difference; per bandwidth: 2-3 FP32 and one MUFU; "
        "`contract_floor`) needs "
        + " / ".join(f"{v:.0f}" for v in per.values())
        + f" instructions per pair ({' / '.join(per)}), i.e. **{_ms(fl)} ms** with every issue slot of every SM "
        f"busy. The goal {_ms(goal)} ms leaves {_ms(max(goal - fl, 0.0))} ms ({max(goal - fl, 0.0) / goal:.0%}) "
        "for every load, shuffle, index computation, reduction and wave tail, and needs "
        f"{fl / goal:.0%} of peak issue spent on required arithmetic (the current kernels: "
        f"{fl / predicted:.0%} by this model, counting the tensor-core kernel's instructions). On CUDA cores the "
        "goal is at the floor; the tensor-core instantiation (32 <= d <= 64) takes D and G off the FP32 pipe, "
        "with the contract's no-shift rule replaced there by a per-tile-pair float64 error bound and a fallback "
        "to direct differences for the tile pairs that fail it.",
    ]


def _render_loops(a: dict) -> List[str]:
    L = [
        "## Loops found (n = 4096, d = 64)",
        "",
        "| op | source line | loop | unroll u | executions / tile / warp | static instr | spill instr |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in a["configs"][0]["rows"]:
        for lp in r["tc"].loops:
            L.append(
                f"| {r['case'].op} | {lp['line']} | {lp['name']} | {lp['u']} | {lp['execs']:g} | {lp['static']} "
                f"| {lp['spills']} |"
            )
    return L + [""]


def triton_kernels(arch: int = 90) -> Tuple[Optional[List[dict]], str]:
    """Registers/spills of the Triton kernels from ``benchmarks/triton_aot.py`` (``compile_all(arch)``), or None
    and the reason it is unavailable."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import triton_aot  # type: ignore
    except Exception as exc:  # missing module or a failing import: reported, not fatal
        return None, f"Not analysed: `benchmarks/triton_aot.py` is not importable ({type(exc).__name__}: {exc})."
    if os.environ.get("TRITON_INTERPRET"):
        return None, "Not analysed: TRITON_INTERPRET is set (the kernels cannot be compiled in this process)."
    try:
        got = triton_aot.compile_all(arch=arch, keep_ptx=False)
    except Exception as exc:
        return None, f"Not analysed: `triton_aot.compile_all(arch={arch})` failed ({type(exc).__name__}: {exc})."
    rows = list(got.values()) if isinstance(got, dict) else list(got)
    rows = [
        r if isinstance(r, dict) else dataclasses.asdict(r) if dataclasses.is_dataclass(r) else {"name": str(r)}
        for r in rows
    ]
    if isinstance(got, dict):
        for name, r in zip(got.keys(), rows):
            r.setdefault("name", name)
    return rows, (
        f"From `benchmarks/triton_aot.py` `compile_all(arch={arch})`: registers and spills per compiled "
        "kernel (the per-pair instruction model above covers the CUDA kernels only)."
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        default=os.path.join(ROOT, "benchmarks", "results", "sm90-static.md"),
        help="markdown report path ('-' for stdout)",
    )
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--force", action="store_true", help="recompile even if the cache has this build")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    args = ap.parse_args(argv)
    if args.arch != 90:
        raise ValueError("the model's limits and rates are those of sm_90; --arch must be 90")
    build = compile_cuda(args.arch, force=args.force)
    a = analyse(build)
    tri, note = (None, "Skipped (--no-triton).") if args.no_triton else triton_kernels(args.arch)
    text = render(a, build, tri, note)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
