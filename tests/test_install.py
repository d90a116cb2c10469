"""Installation as users meet it: import and first-call cost, the torch-version check of the compiled extension,
the README's Install section executed verbatim (CPU kernels, in a fresh virtual environment that sees this
environment's torch through a ``.pth`` line), the sdist's contents, and a source tree run without an install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd=None, env=None, exe=sys.executable) -> str:
    proc = subprocess.run(
        [exe, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_import_does_not_import_dynamo():
    out = _python("""
        import sys, gmwae_fast
        print(sorted(m for m in ("torch._dynamo", "triton") if m in sys.modules))
    """)
    assert out.strip() == "[]"


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_first_eager_call_does_not_import_dynamo(grad, reduction):
    """The first fast_imq_mmd call used to import torch._dynamo through the custom-op wrapper (892 modules,
    1.5-23 s); eager calls on the compiled CPU kernels must not, so the first call costs about what the second does
    (both are printed; the import itself is what this checks)."""
    out = _python(f"""
        import sys, time, torch, gmwae_fast
        if gmwae_fast.backends.unavailable_reason("cpu", "cpu") is not None:
            print("skip"); sys.exit(0)
        x = torch.randn(128, 64, requires_grad={grad}); y = torch.randn(128, 64)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            v = gmwae_fast.fast_imq_mmd(x, y, reduction="{reduction}").sum()
            if {grad}:
                v.backward()
            times.append(time.perf_counter() - t0)
        print(sorted(m for m in ("torch._dynamo", "triton") if m in sys.modules), times)
    """)
    if out.strip() == "skip":
        pytest.skip("the compiled CPU kernels are not available")
    assert out.startswith("[] "), out


def test_constant_marker_matches_torch_decorator():
    # In a process without torch._dynamo our marker must be what torch's public decorator sets.
    out = _python("""
        import sys
        from gmwae_fast import backends
        assert "torch._dynamo" not in sys.modules
        def ours(): pass
        def theirs(): pass
        backends.assume_constant_result(ours)
        import torch
        torch.compiler.assume_constant_result(theirs)
        assert vars(ours) == vars(theirs) and vars(theirs), (vars(ours), vars(theirs))
        assert vars(backends._resolve) == vars(theirs)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_torch_mismatch_messages():
    import torch

    from gmwae_fast.backends import torch_mismatch

    running = torch.__version__
    assert torch_mismatch(None, None) is None
    assert torch_mismatch(running, bool(torch._C._GLIBCXX_USE_CXX11_ABI)) is None
    assert torch_mismatch(running.split("+")[0], None) is None  # _C.TORCH_VERSION has no local part
    msg = torch_mismatch("1.13.0+cpu", None)
    assert "built against torch 1.13.0+cpu" in msg and running in msg
    assert "_GLIBCXX_USE_CXX11_ABI" in torch_mismatch(running, not torch._C._GLIBCXX_USE_CXX11_ABI)
    if "+" in running:  # same release, other build (e.g. +cpu vs +cu130): a different library
        assert torch_mismatch(running.split("+")[0] + "+other", None) is not None


def test_mismatched_build_disables_compiled_backends_only():
    out = _python(
        """
        import sys, types, warnings, torch
        fake = types.ModuleType("gmwae_fast._build_config")   # as if built against another torch
        fake.torch_version, fake.cpu_compiled = "1.13.0+cpu", True
        sys.modules["gmwae_fast._build_config"] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import gmwae_fast
            from gmwae_fast import reference
            reasons = gmwae_fast.available_backends("cpu")
        assert "gmwae_fast._C" not in sys.modules
        assert "built against torch 1.13.0+cpu" in reasons["cpu"], reasons
        assert reasons["reference"] is None
        assert len(caught) == 1 and "rebuild" in str(caught[0].message), [str(w.message) for w in caught]
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(37, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(29, 5, generator=gen, dtype=torch.float64)
        got = gmwae_fast.fast_imq_mmd(x, y)   # auto falls back to the reference backend
        want = reference.imq_mmd_reference(x, y, bandwidths=reference.bandwidths_for(5, gmwae_fast.WAE_SCALES))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        try:
            gmwae_fast.fast_imq_mmd(x, y, backend="cpu")
        except RuntimeError as exc:
            assert "built against torch" in str(exc)
        else:
            raise AssertionError("backend='cpu' ran with a mismatched extension")
        print("ok")
    """,
        env={**os.environ, "GMWAE_FAST_QUIET_EXT": "0"},
    )
    assert out.strip().endswith("ok")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the sdist test copies the tracked files")
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [p for p in out.splitlines() if (ROOT / p).is_file()]


def _fresh_venv(path: Path, overlay: Path) -> Path:
    """A venv without pip whose ``.pth`` line puts this environment's packages (torch, pip, setuptools) after its
    own: through ``overlay``, a folder of links to every entry of this site-packages except gmwae_fast's own (its
    dist-info and editable finder) and pip (so that ``python -m venv`` installs the venv's own pip), so that pip in
    the new venv neither sees nor touches this environment's gmwae_fast."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    parent = Path(sysconfig.get_paths()["purelib"])
    overlay.mkdir(parents=True)
    for entry in parent.iterdir():
        mine = "gmwae_fast" in entry.name or entry.name == "pip" or entry.name.startswith("pip-")
        if not mine and not entry.name.endswith(".pth"):
            (overlay / entry.name).symlink_to(entry)
    exe = path / "bin" / "python"
    site = _python("import sysconfig; print(sysconfig.get_paths()['purelib'])", exe=exe).strip()
    Path(site, "zz_parent_env.pth").write_text(f"{overlay}\n")
    return exe


def _readme_install_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def _copy_tracked(dst: Path) -> list[str]:
    files = _tracked_files()
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    return files


@pytest.mark.slow
def test_readme_install_section_runs_verbatim(tmp_path):
    """The README's Install commands, executed as written in a copy of the checkout (CPU kernels:
    GMWAE_FAST_SKIP_CUDA=1). The venv they create is made beforehand with a .pth line to this environment's
    site-packages, so `pip install "torch>=2.11" ...` finds the pinned torch installed instead of downloading one."""
    commands = _readme_install_commands()
    assert commands[0].startswith("python -m venv .venv") and any("--no-build-isolation" in c for c in commands)
    src = tmp_path / "checkout"
    _copy_tracked(src)
    _fresh_venv(src / ".venv", overlay=tmp_path / "parent-site")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(GMWAE_FAST_SKIP_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"), PIP_NO_INDEX="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `python` = this interpreter before activation
    script = "set -e\n" + "\n".join(commands) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=src, capture_output=True, text=True, env=env, timeout=1800)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "OK:" in proc.stdout and "checks passed" in proc.stdout, log
    # pip shows a build's output only with -v; the build's own summary line, as setup.sh shows it (a no-op rebuild)
    again = subprocess.run(
        [str(src / ".venv" / "bin" / "python"), "setup.py", "build_ext", "--inplace"],
        cwd=src,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    summary = [line for line in again.stderr.splitlines() if line.startswith("gmwae_fast build:")]
    assert len(summary) == 1 and "C++ CPU kernels" in summary[0], again.stderr[-3000:]
    assert "CUDA: skipped because GMWAE_FAST_SKIP_CUDA=1" in summary[0] and " min " in summary[0], summary
    out = _python(
        """
        import gmwae_fast
        info = gmwae_fast.build_info()
        assert info["cpu_compiled"] and not info["cuda_compiled"], info
        assert info["cuda_skipped_reason"] == "GMWAE_FAST_SKIP_CUDA=1", info
        print("ok", gmwae_fast.__file__)
        """,
        cwd=src,
        exe=src / ".venv" / "bin" / "python",
    )
    assert out.startswith("ok " + str(src)), out
    # this environment's own install is untouched
    finder = "".join(p.read_text() for p in Path(sysconfig.get_paths()["purelib"]).glob("__editable__*gmwae_fast*"))
    assert str(tmp_path) not in finder


@pytest.mark.slow
def test_sdist_holds_every_source(tmp_path):
    pytest.importorskip("build", reason="python -m build is needed (pip install build)")
    src = tmp_path / "src"
    files = _copy_tracked(src)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        env={**os.environ, "GMWAE_FAST_SKIP_CUDA": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = list((tmp_path / "dist").glob("gmwae_fast-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {
        p
        for p in files
        if p.startswith(("csrc/", "kernels/", "gmwae_fast/")) and p.endswith((".h", ".cuh", ".cu", ".cpp", ".py"))
    }
    assert any(p.endswith(".cu") for p in needed) and any(p.startswith("csrc/testing/") for p in needed)
    assert needed <= names, sorted(needed - names)
    assert not any(n.endswith((".so", "_build_config.py")) for n in names)


def test_source_tree_runs_without_install(tmp_path):
    """gpu_check.sh's setting: a source tree built in place, on PYTHONPATH, not installed. Every backend imports
    from it (the Triton kernels live in the top-level kernels/, which only an install maps to gmwae_fast.kernels),
    and available_backends() reports triton unusable when its kernel module cannot be imported."""
    pytest.importorskip("triton")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "gmwae_fast", tree / "gmwae_fast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", tree / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", tree / "setup.py")
    env = dict(os.environ, PYTHONPATH=str(tree), TRITON_INTERPRET="1", GMWAE_FAST_QUIET_EXT="1")
    code = """
        import sys
        # an editable install of this checkout would map gmwae_fast.kernels: take its finder out
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
        import torch, gmwae_fast
        from pathlib import Path
        tree = Path(sys.argv[1]).resolve()
        assert Path(gmwae_fast.__file__).resolve().parent == tree / "gmwae_fast", gmwae_fast.__file__
        assert gmwae_fast.available_backends("cpu")["triton"] is None, gmwae_fast.available_backends("cpu")
        x = torch.randn(9, 3, requires_grad=True)
        y = torch.randn(7, 3)
        v = gmwae_fast.fast_imq_mmd(x, y, backend="triton")
        v.backward()
        r = gmwae_fast.fast_imq_mmd(x.detach().double(), y.double(), backend="reference")
        assert abs(v.item() - r.item()) <= 1e-5 * abs(r.item()), (v.item(), r.item())
        mod = sys.modules["gmwae_fast.kernels.imq_mmd"]
        assert Path(mod.__file__).resolve() == tree / "kernels" / "imq_mmd.py", mod.__file__
        print("ok")
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tree)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    # a tree whose kernel module is broken: reported, not claimed usable
    (tree / "kernels" / "imq_mmd.py").write_text("raise ImportError('broken kernels (test)')\n")
    code = """
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
        import gmwae_fast
        reason = gmwae_fast.available_backends("cpu")["triton"]
        assert reason is not None and "gmwae_fast.kernels.imq_mmd could not be imported" in reason, reason
        assert "broken kernels (test)" in reason, reason
        print("ok")
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_no_import_cycle_between_mmd_distributed_and_reference():
    """The shared argument checks live in gmwae_fast/_common.py, which imports none of the three."""
    import ast

    def imports(name: str) -> set[str]:
        tree = ast.parse((ROOT / "gmwae_fast" / f"{name}.py").read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                out |= {node.module} if node.module else {a.name for a in node.names}
        return out

    assert not imports("_common") & {"mmd", "distributed", "reference"}
    assert not imports("reference") & {"mmd", "distributed"}
    assert "mmd" not in imports("distributed")
