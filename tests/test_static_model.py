"""The SASS classifier, loop finder and trip model of benchmarks/static_model.py (no GPU needed).

The hand-written snippet below is shaped like ``nvdisasm -gi`` output of a kernel with an outer loop (line 20),
an inner loop unrolled by 2 (line 30, 2 x 16 FFMA per SASS iteration), a branch back from out-of-line code
after the EXIT (not a loop) and the trailing self-branch.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import static_model as sm  # noqa: E402

F = '//## File "/x/k.cuh", line {}'
SNIPPET = "\n".join(
    [
        "//--------------------- .text._Z4kernPf --------------------------",
        ".text._Z4kernPf:",
        F.format(10),
        "        /*0000*/                   LDC R1, c[0x0][0x28] ;",
        ".L_x_0:",
        F.format(20),
        "        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;",
        ".L_x_1:",
        F.format(31) + ' inlined at "/x/k.cuh", line 30',
        F.format(30),
        "        /*0020*/                   LDS.128 R4, [R3] ;",
        "        /*0030*/                   FADD R8, R4, -R5 ;",
        "        /*0040*/                   FFMA R9, R8, R8, R9 ;",
        "        /*0050*/                   MUFU.RCP R10, R9 ;",
        "        /*0060*/              @!P0 BRA `(.L_x_1) ;",
        F.format(20),
        "        /*0070*/                   DADD R12, R12, R14 ;",
        "        /*0080*/                   STL [R1], R12 ;",
        "        /*0090*/               @P1 BRA `(.L_x_0) ;",
        "        /*00a0*/                   EXIT ;",
        ".L_x_2:",
        "        /*00b0*/                   BRA `(.L_x_1) ;",
        ".L_x_3:",
        "        /*00c0*/                   BRA `(.L_x_3) ;",
    ]
)


def test_classify_opcodes_by_pipe():
    expect = {
        "FFMA": "fp32",
        "FADD.FTZ": "fp32",
        "FMUL": "fp32",
        "DFMA": "fp64",
        "DADD": "fp64",
        "MUFU.RCP": "mufu",
        "HMMA.16816.F32": "tensor",
        "DMMA.884": "tensor",
        "LDS.128": "lsu",
        "STG.E.64": "lsu",
        "LDL.LU": "lsu",
        "SHFL.BFLY": "lsu",
        "BRA": "control",
        "BAR.SYNC.DEFER_BLOCKING": "control",
        "IADD3": "alu",
        "ISETP.GE.AND": "alu",
        "FMNMX": "alu",
        "F2F.F64.F32": "conv",
        "ULDC.64": "uniform",
        "R2UR": "uniform",
    }
    assert {op: sm.classify(op) for op in expect} == expect
    with pytest.raises(ValueError, match="empty SASS opcode"):
        sm.classify("")


def test_parse_snippet_frames_and_predicates():
    (fn,) = sm.parse_sass(SNIPPET)
    assert fn.name == "_Z4kernPf"
    assert len(fn.instrs) == 13
    rcp = fn.instrs[5]
    assert rcp.opcode == "MUFU.RCP" and rcp.frames == (("k.cuh", 31), ("k.cuh", 30))
    br = fn.instrs[6]
    assert br.pred == "!P0" and br.branch_target(fn.labels) == 0x20
    assert fn.instrs[3].branch_target(fn.labels) is None


def test_loops_nest_and_skip_out_of_line_code():
    (fn,) = sm.parse_sass(SNIPPET)
    assert sm.main_body_end(fn) == 11
    loops = sm.find_loops(fn)
    assert [(lp.start, lp.end) for lp in loops] == [(1, 9), (2, 6)]
    assert loops[1].parent == 0 and loops[1].depth == 1 and loops[0].parent is None
    counts = sm.pipe_counts(fn.instrs[loops[1].start : loops[1].end + 1])
    assert counts["fp32"] == 2 and counts["mufu"] == 1 and counts["lsu"] == 1 and counts["control"] == 1
    assert sum(counts.values()) == 5


def test_overlapping_back_edges_are_rejected():
    bad = SNIPPET.replace("@P1 BRA `(.L_x_0)", "@P1 BRA 0x30")
    (fn,) = sm.parse_sass(bad)
    with pytest.raises(ValueError, match="overlapping loops"):
        sm.find_loops(fn)


def test_unknown_branch_label_is_an_error():
    (fn,) = sm.parse_sass(SNIPPET.replace("BRA `(.L_x_0)", "BRA `(.L_x_99)"))
    with pytest.raises(ValueError, match="unknown label"):
        sm.find_loops(fn)


def test_source_region_and_groups():
    text = "void f() {\n  for (int k = 0; k < kc; ++k) {\n    a += 1;\n  }\n  if (x) y = 1;\n}\n"
    assert sm.source_region(text, r"for \(int k") == (2, 2, 4)
    assert sm.source_region(text, r"if \(x\)") == (5, 5, 5)
    with pytest.raises(ValueError, match="no statement matches"):
        sm.source_region(text, r"while")
    assert sm.bandwidth_groups([2.0 * 64 * s for s in sm.PAPER_SCALES]) == (3, 3, 3, 3, 3)
    assert sm.bandwidth_groups([1.0, 2.0, 5.0, 10.0, 1e5, 1e10]) == (3, 2, 1)
    # the CUDA kernels: one scale for every bandwidth unless they span more than 2^40
    assert sm.bandwidth_scales([2.0 * 64 * s for s in sm.PAPER_SCALES]) == (15,)
    assert sm.bandwidth_scales([1e-3, 50.0, 1e5]) == (3,)
    assert sm.bandwidth_scales([1.0, 2.0**41]) == (1, 1)


def test_occupancy_limits():
    assert sm.occupancy(128, 75000, 256) == (2, 0.25, "registers")
    assert sm.occupancy(32, 120000, 256)[0] == 1  # shared memory: 2 x (120000 + 1024) > 228 KiB
    assert sm.occupancy(32, 0, 1024)[:2] == (2, 1.0)  # registers and threads both allow 2 blocks
    assert sm.occupancy(16, 0, 1024) == (2, 1.0, "threads")


def _build_or_skip():
    try:
        sm.toolchain()
    except RuntimeError as exc:
        pytest.skip(f"nvcc/nvdisasm/cuobjdump missing: {exc}")
    return sm.compile_cuda(90)  # cached under build/static_model/ (about a minute when the sources changed)


HOT = ("D: ", "K: ", "G: ", "TC D: ", "TC G: ")  # the per-pair loops of the trip model


@pytest.mark.parametrize("tensor_cores", [False, True])
def test_float_tile_kernels_do_not_spill_in_hot_loops(tensor_cores):
    """Every float tile kernel (CUDA-core and tensor-core instantiations), at d = 64 and d = 10, on its own route
    and (tensor-core kernels) on the CUDA-core fallback of a tile pair that fails the error gate."""
    build = _build_or_skip()
    fns = sm.parse_sass(build.sass)
    for self_term in (False, True):
        for grad in (False, True):
            fn = sm.tile_function(fns, self_term, grad, tensor_cores=tensor_cores)
            for d, route in ((64, tensor_cores), (64, False), (10, False)):
                case = sm.wae_cases(4096, d)[0 if not self_term else (1 if grad else 2)]
                case = sm.Case(
                    case.op if grad == case.grad else ("self-values" if self_term else "cross-values"),
                    case.n,
                    case.m,
                    case.d,
                    case.scales,
                    case.b_grad,
                    tc=route,
                )
                tc = sm.tile_counts(fn, case, build.text)
                hot = [lp for lp in tc.loops if lp["name"].startswith(HOT)]
                assert hot, f"{fn.name}: no per-pair loop found"
                if route:
                    assert any(lp["name"].startswith("TC ") and lp["execs"] > 0 for lp in hot), fn.name
                spilling = [(lp["name"], lp["line"], lp["spills"]) for lp in hot if lp["spills"]]
                assert not spilling, f"{sm._demangle(fn.name)} spills in its hot loops: {spilling}"


def test_trip_model_counts_the_distance_loop_exactly():
    build = _build_or_skip()
    fn = sm.tile_function(sm.parse_sass(build.sass), True, False)
    for d in (10, 64, 100):
        case = sm.Case("self-values", 1000, 1000, d, (15,), tc=False)  # the CUDA-core kernel
        tc = sm.tile_counts(fn, case, build.text)
        dl = [lp for lp in tc.loops if lp["name"].startswith("D: ")]
        # every coordinate of every chunk: SASS iterations x unroll = d per tile (remainders run peeled)
        assert sum(lp["execs"] * lp["u"] for lp in dl) <= d
        k = [lp for lp in tc.loops if lp["name"].startswith("K: ")]
        # one bandwidth per SASS iteration and unrolled copy: 15 in all (the per-band-scale loop is not entered)
        assert sum(lp["execs"] * lp["u"] for lp in k) == 15
        # one reciprocal per pair and bandwidth (plus the per-row 64-bit group divisions of the tile setup)
        assert 15 <= tc.per_pair("mufu") < 15.5


def test_trip_model_counts_the_tensor_core_loops_exactly():
    """The tensor-core kernel at d = 64 (sm_90: DMMA.16x8x8, 1024 multiply-adds): d / 8 steps of 4 DMMA per warp
    in the D phase, 8 steps of 4 per side in the G phase (2 sides in self-grad): 64^3 multiply-adds per GEMM and
    tile, exactly the GEMM work; no CUDA-core D or G loop runs."""
    build = _build_or_skip()
    fns = sm.parse_sass(build.sass)
    for op, sides in (("self-values", 0), ("cross-grad", 1), ("self-grad", 2)):
        self_term, grad = op.startswith("self"), op.endswith("grad")
        fn = sm.tile_function(fns, self_term, grad, tensor_cores=True)
        case = sm.Case(op, 4096, 4096, 64, (15,), b_grad=sides == 2)
        tc = sm.tile_counts(fn, case, build.text)
        dmma_per_warp = (64 // 8) * 4 * (1 + sides)  # one 64 x 64 x 64 GEMM per phase and side, 8 warps
        assert tc.per_warp["tensor"] == pytest.approx(dmma_per_warp)
        assert tc.tensor_units * 256 * 8 == pytest.approx(64**3 * (1 + sides))
        assert not [lp for lp in tc.loops if lp["name"].startswith(("D: ", "G: ")) and lp["execs"] > 0]
        # the fallback of a tile pair that fails the gate: no tensor-core work, the CUDA-core loops instead
        off = sm.tile_counts(fn, sm.Case(op, 4096, 4096, 64, (15,), b_grad=sides == 2, tc=False), build.text)
        assert off.per_warp["tensor"] == 0
        assert [lp for lp in off.loops if lp["name"].startswith("D: ") and lp["execs"] > 0]


def test_contract_floor_counts_the_required_arithmetic():
    """Per coordinate: the difference (FADD) and the distance (FFMA) once, one FFMA per gradient side; per
    bandwidth 3 FP32 with a gradient, 2 without, and one reciprocal."""
    g = sm.bandwidth_scales([2.0 * 64 * s for s in sm.PAPER_SCALES])
    cross, self_grad, self_values = sm.wae_cases(4096, 64)
    assert sum(g) == 15 and not cross.b_grad and self_grad.b_grad
    assert sm.contract_floor(cross) == dict(fp32=3 * 64 + 45, mufu=15, issue=3 * 64 + 60)
    assert sm.contract_floor(self_grad) == dict(fp32=4 * 64 + 45, mufu=15, issue=4 * 64 + 60)
    assert sm.contract_floor(self_values) == dict(fp32=2 * 64 + 30, mufu=15, issue=2 * 64 + 45)
    # n^2 cross pairs + 2 x n(n-1)/2 self pairs at 128 thread instructions per SM and clock.
    n = 4096
    instr = n * n * 252 + n * (n - 1) // 2 * (316 + 173)
    expect = instr / (128 * sm.H100_SXM.sms * sm.H100_SXM.clock_ghz * 1e9)
    assert sm.floor_seconds(4096, 64) == pytest.approx(expect, rel=1e-12)
    assert 0.24e-3 < sm.floor_seconds(4096, 64) < 0.3e-3  # the d = 64 goal sits just above the floor


def test_every_trip_and_region_pattern_matches_the_kernel_source():
    """A pattern that stops matching (a reformatted or restructured kernel) would give its loop or branch body a
    weight of 1 without a word: the model refuses such a source, and this test catches it without nvcc."""
    with open(os.path.join(sm.CSRC, sm.KERNEL_HEADER)) as f:
        text = f.read()
    for spec in sm.TRIP_MODEL + sm.REGION_MODEL:
        sm._require_match(spec.pattern, text)
    with pytest.raises(ValueError, match="trip model needs updating"):
        sm._require_match(r"else g_side<", "if (nl <= 1)\n  g_side<T, 1, true>(P);\nelse\n  g_side<T, NL, true>(P);")
