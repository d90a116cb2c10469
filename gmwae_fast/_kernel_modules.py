"""Where the Triton kernel modules (``gmwae_fast.kernels.<name>``) are imported from.

The kernels live in the top-level ``kernels/`` folder of the source tree; an install (wheel or ``pip install -e``)
maps that folder to the package ``gmwae_fast.kernels`` (``setup.py``'s ``package_dir``). A source checkout built
in place and put on ``PYTHONPATH`` without an install (how ``scripts/gpu_check.sh`` runs) has no such mapping, so
:func:`load` registers ``kernels/`` under that name first when this package sits in a source tree. Either way the
same files run under one module name, so Triton's kernel cache and the tests see one module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["load", "source_kernels_dir"]

_PACKAGE = "gmwae_fast.kernels"


def source_kernels_dir() -> Optional[Path]:
    """The ``kernels/`` folder of the source tree this package was imported from, or ``None`` (an installed
    wheel: no ``setup.py`` beside the package)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "kernels" / "__init__.py").is_file():
        return root / "kernels"
    return None


def _register_source_package(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        _PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_PACKAGE]
        raise
    setattr(sys.modules["gmwae_fast"], "kernels", module)


def load(name: str) -> ModuleType:
    """``gmwae_fast.kernels.<name>`` (``"imq_mmd"``, ``"gm_reparam"``): from this source tree's ``kernels/`` when
    the package runs from a source tree, else the installed package. Imports Triton (the module's own import)."""
    if _PACKAGE not in sys.modules:
        folder = source_kernels_dir()
        if folder is not None:
            _register_source_package(folder)
    return importlib.import_module(f"{_PACKAGE}.{name}")
