"""The packages' top levels export what the rest of the project imports from their modules.

Every public name (no leading underscore, from a module without one) that the clients --
the figures, benchmarks, examples and the README -- import from a submodule of ``spectra`` or
``entropy_opt`` must be importable from the package itself, be the same object there and
be listed in ``__all__``; ``__all__`` names only what the package holds, once each.  The
tests are white-box and may import internals (a checkpoint class, a kernel helper).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spectra", "entropy_opt")


def _sources() -> dict[str, str]:
    """Python source of every place that imports the packages, by relative path."""
    out: dict[str, str] = {}
    for folder in ("figures", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[str(path.relative_to(ROOT))] = path.read_text()
    for path in sorted((ROOT / "examples").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        # IPython magics and shell escapes are not Python
        lines = [
            ln for ln in "\n".join(code).splitlines() if not ln.lstrip().startswith(("%", "!"))
        ]
        out[str(path.relative_to(ROOT))] = "\n".join(lines)
    readme = (ROOT / "README.md").read_text()
    out["README.md"] = "\n".join(re.findall(r"```python\n(.*?)```", readme, re.S))
    return out


def _submodule_imports() -> dict[tuple[str, str, str], list[str]]:
    """(package, submodule, name) -> the files importing ``name`` from that submodule."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for where, source in _sources().items():
        try:
            tree = ast.parse(source)
        except SyntaxError:  # a README block with an ellipsis placeholder, say
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            package, _, module = node.module.partition(".")
            if package not in PACKAGES or not module or "_" == module.split(".")[-1][:1]:
                continue
            for alias in node.names:
                if not alias.name.startswith("_"):
                    found.setdefault((package, module, alias.name), []).append(where)
    return found


IMPORTS = _submodule_imports()


def test_the_scan_finds_the_imports():
    # a guard for the scan itself: these imports exist in the benchmarks
    assert ("spectra", "lanczos", "lanczos") in IMPORTS
    assert ("spectra", "dense_eigensolver", "eigvalsh_inplace") in IMPORTS


@pytest.mark.parametrize("package, module, name", sorted(IMPORTS))
def test_imported_names_are_exported(package, module, name):
    top = importlib.import_module(package)
    sub = importlib.import_module(f"{package}.{module}")
    where = ", ".join(IMPORTS[(package, module, name)])
    assert name in top.__all__, f"{package}.{module}.{name} (imported by {where}) not exported"
    assert getattr(top, name) is getattr(sub, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_lists_what_the_package_holds(package):
    top = importlib.import_module(package)
    assert len(top.__all__) == len(set(top.__all__))
    missing = [name for name in top.__all__ if not hasattr(top, name)]
    assert not missing
