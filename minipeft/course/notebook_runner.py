"""Execute notebooks in place with nbclient (kernel python3, working directory = the notebook's folder).

    python -m minipeft.course.notebook_runner run notebooks/00_setup_and_baselines.ipynb [more.ipynb ...]
    python -m minipeft.course.notebook_runner normalise notebooks/*.ipynb    # metadata only, no execution

This is how the committed notebooks get their outputs (a full, not fast, run: unset MINIPEFT_FAST).
The kernel inherits this process's environment.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


# The kernelspec JupyterLab writes into a notebook as soon as its kernel starts (ipykernel's own python3 spec). A
# notebook saved with another one (e.g. display_name "Python 3") is marked modified the moment it opens.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def normalise(nb):
    """Give ``nb`` the metadata JupyterLab would rewrite on opening it (the kernelspec); returns whether it changed.
    language_info is the executing kernel's already (nbclient writes it)."""
    changed = dict(nb.metadata.get("kernelspec", {})) != KERNELSPEC
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return changed


def execute(path, timeout: int = 3600, write: bool = True, kernel: str = "python3"):
    """Run every cell of ``path`` top to bottom; write the outputs back when ``write``; return the notebook.

    A failing cell raises ``nbclient.exceptions.CellExecutionError`` (nothing is written then); the partly
    executed notebook is on the exception as ``.notebook``.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    if path.suffix != ".ipynb" or not path.is_file():
        raise FileNotFoundError(f"{path} is not a notebook file (.ipynb)")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    try:
        client.execute()
    except CellExecutionError as e:
        e.notebook = nb
        raise
    if write:
        normalise(nb)
        nbformat.write(nb, path)
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minipeft.course.notebook_runner")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks in place")
    run.add_argument("paths", nargs="+")
    run.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    norm = sub.add_parser("normalise", help="give notebooks the kernelspec JupyterLab writes (no execution)")
    norm.add_argument("paths", nargs="+")
    args = p.parse_args(argv)
    if args.command == "normalise":
        import nbformat

        for path in args.paths:
            nb = nbformat.read(path, as_version=4)
            if normalise(nb):
                nbformat.write(nb, path)
                print(f"normalised {path}", file=sys.stderr)
        return
    for path in args.paths:
        t = time.perf_counter()
        execute(path, timeout=args.timeout)
        print(f"ran {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
