"""Three layers, imports in one direction: ``minipeft`` (the library) imports nothing from ``minipeft.lab`` (the
experiment harness) or ``minipeft.course`` (checks, exercises, figures, widgets), and ``minipeft.lab`` nothing from
``minipeft.course``; ``import minipeft`` loads neither. ``minipeft/__main__.py`` is the one bridge up: it is the
``python -m minipeft`` entry, which Python runs, never ``import minipeft``.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minipeft"
LAYERS = ("minipeft.course", "minipeft.lab", "minipeft")  # top down: each imports only the ones after it


def layer(module: str) -> int:
    return next(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every minipeft module ``path`` imports, at the top or inside a function, relative imports resolved."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # "from . import transfer" imports a module; "from .api import x" the module api
            found |= {f"{target}.{a.name}" for a in node.names} if not node.module else {target}
    return {m for m in found if m == "minipeft" or m.startswith("minipeft.")}


def test_imports_point_down_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__main__.py":
            continue
        source = module_name(path)
        upward += [f"{source} imports {m}" for m in imported_modules(path) if layer(m) < layer(source)]
    assert not upward, upward


def test_the_scan_sees_lazy_and_relative_imports():
    found = imported_modules(PACKAGE / "api.py")
    assert {"minipeft.core", "minipeft.methods.fusion"} <= found  # a top-level and a lazy (in-function) import
    assert "minipeft.lab.transfer" in imported_modules(PACKAGE / "lab" / "__init__.py")  # "from . import transfer"
    assert layer("minipeft.lab.train") < layer("minipeft.api") and layer("minipeft.course.widgets") < layer("minipeft.lab")


def loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m for m in sys.modules if m.startswith('minipeft'))))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split()


def test_import_minipeft_loads_no_lab_or_course_module():
    loaded = loaded_after("import minipeft")
    assert "minipeft.api" in loaded and "minipeft.methods.fusion" in loaded  # the library itself is there
    assert not [m for m in loaded if layer(m) < layer("minipeft")], loaded


def test_the_lab_loads_no_course_module():
    loaded = loaded_after("import minipeft.lab.compare, minipeft.lab.cli, minipeft.lab.distributed")
    assert "minipeft.lab.transfer" in loaded  # the lab registers its fusion recipe
    assert not [m for m in loaded if m.startswith("minipeft.course")], loaded


def test_python_m_minipeft_is_the_lab_command_line():
    run = subprocess.run([sys.executable, "-m", "minipeft", "--help"], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert run.returncode == 0 and "commands:" in run.stdout and "compare" in run.stdout, run.stderr[-3000:]
