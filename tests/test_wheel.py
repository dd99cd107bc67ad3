"""A package people can install: `python -m build` makes an sdist and, from it, a wheel that holds every module,
the single-sourced version and the runtime dependencies. Built without isolation (this venv's setuptools: fast,
no download); the clean-venv install + README snippet is .ci/check_wheel.py (slow: run by hand, not in CI).
"""
import email
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import minipeft

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("build")


def test_wheel_builds_and_holds_every_module(tmp_path):
    out = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    wheel, = out.glob("minipeft-*.whl")
    sdist, = out.glob("minipeft-*.tar.gz")
    assert wheel.name == f"minipeft-{minipeft.__version__}-py3-none-any.whl"  # version from minipeft/__init__.py
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "minipeft").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules and not modules - names, f"missing from the wheel: {sorted(modules - names)}"
    assert not [n for n in names if n.split("/")[0] in {"tests", "notebooks", "solutions", "exercises", "results"}]
    meta, = [n for n in names if n.endswith(".dist-info/METADATA")]
    info = email.message_from_bytes(zipfile.ZipFile(wheel).read(meta))
    assert info["Version"] == minipeft.__version__
    requires = " ".join(info.get_all("Requires-Dist"))
    assert "torch>=" in requires and "transformers" in requires and "safetensors" in requires
    assert 'jupyterlab' in requires and 'extra == "dev"' in requires  # the course's extras travel with it
    with tarfile.open(sdist) as tar:  # the wheel was built from this sdist, so it holds the sources too
        assert {f"minipeft-{minipeft.__version__}/{m}" for m in modules} <= set(tar.getnames())
