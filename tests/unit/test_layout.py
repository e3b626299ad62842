"""The package's layout holds: the core works without the shapes world, and dependencies point one way.

The shapes world (``cm_lightning/shapes``) imports the core; nothing in the core imports it. ``models`` (loading
SD parts, LoRA) knows nothing of evaluation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cm_lightning"
TESTS = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved), at any depth in the file."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import shapes`
    return found


CORE = sorted(p for p in PACKAGE.rglob("*.py") if "shapes" not in p.relative_to(PACKAGE).parts)


def test_the_scan_sees_relative_and_absolute_imports():
    imports = imported_modules(PACKAGE / "shapes" / "table.py")
    assert "cm_lightning.eval.metrics" in imports and "cm_lightning.shapes.judge" in imports
    assert "cm_lightning.models.components" in imports


def test_no_core_file_imports_the_shapes_world():
    offenders = {module_name(p): sorted(m for m in imported_modules(p) if m.startswith("cm_lightning.shapes"))
                 for p in CORE}
    assert not {k: v for k, v in offenders.items() if v}


def test_models_import_nothing_from_eval():
    files = sorted((PACKAGE / "models").rglob("*.py"))
    assert files
    offenders = {module_name(p): sorted(m for m in imported_modules(p) if m.startswith("cm_lightning.eval"))
                 for p in files}
    assert not {k: v for k, v in offenders.items() if v}


BLOCKER = """
import importlib.abc, importlib, sys

class NoShapes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cm_lightning.shapes" or name.startswith("cm_lightning.shapes."):
            raise ImportError(f"the core imported {name}")
        return None

sys.meta_path.insert(0, NoShapes())
for name in sys.argv[1:]:
    importlib.import_module(name)
try:
    import cm_lightning.shapes  # noqa: F401
except ImportError:
    print("blocked", len(sys.argv) - 1)
"""


def test_every_core_module_imports_with_the_shapes_world_blocked():
    modules = [module_name(p) for p in CORE]
    assert "cm_lightning.train" in modules and "cm_lightning.methods.base" in modules
    done = subprocess.run([sys.executable, "-c", BLOCKER, *modules], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"blocked {len(modules)}"  # the blocker was live while they imported


def test_no_test_module_imports_another():
    """Shared helpers and fixtures live in conftest.py only."""
    offenders = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        bad = [node.module or "." for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.level > 0 or (node.module or "").split(".")[0] == "tests")]
        bad += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
                if a.name.split(".")[0] == "tests"]
        if bad:
            offenders[path.relative_to(TESTS).as_posix()] = bad
    assert not offenders
