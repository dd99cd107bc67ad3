"""Generate the exercise notebooks from their solutions.

    python -m minipeft.course.exercises build     # solutions/NN_*.ipynb -> exercises/NN_*.ipynb
    python -m minipeft.course.exercises check     # exit 1 if exercises/ is not what build would write

In a solution, every region between a line ``### BEGIN SOLUTION`` and a line ``### END SOLUTION`` becomes
``raise NotImplementedError("...")`` at the indentation of the BEGIN line; outputs, execution counts and
execution metadata are cleared. The output is a pure function of the input (byte-identical on rebuild).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .notebook_runner import KERNELSPEC

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
NOTEBOOK_NAME = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")
ROOT = Path(__file__).resolve().parents[2]
BANNER = ("*This notebook is generated from `solutions/{name}` by `python -m minipeft.course.exercises build`; "
          "edit the solution, not this file.* Replace each `raise NotImplementedError(...)` with your "
          "code, then run the check cell below it.")


def strip_solutions(source: str, where: str = "") -> str:
    """Replace each BEGIN/END SOLUTION region (markers included) by a NotImplementedError line."""
    out, region = [], None
    for i, line in enumerate(source.split("\n")):
        marker = line.strip()
        if marker.startswith(BEGIN):
            if region is not None:
                raise ValueError(f"{where}: line {i + 1}: {BEGIN} inside another solution region")
            indent = line[: len(line) - len(line.lstrip())]
            hint = marker[len(BEGIN):].strip(" :-") or "write your solution here"
            out.append(f"{indent}raise NotImplementedError({('Exercise: ' + hint)!r})")
            region = i
        elif marker.startswith(END):
            if region is None:
                raise ValueError(f"{where}: line {i + 1}: {END} without a {BEGIN} before it")
            region = None
        elif region is None:
            out.append(line)
    if region is not None:
        raise ValueError(f"{where}: line {region + 1}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def make_exercise(solution_nb, name: str):
    """The exercise notebook (a new nbformat object) for a solution notebook."""
    import copy

    import nbformat

    nb = copy.deepcopy(solution_nb)
    # the metadata JupyterLab writes on opening (kernelspec, and language_info as the solution's kernel gave it),
    # so that an exercise opens unmodified
    nb.metadata = {k: v for k, v in nb.metadata.items() if k == "language_info"}
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    n_regions = 0
    for i, cell in enumerate(nb.cells):
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in ("tags",)}
        if cell.cell_type == "code":
            n_regions += cell.source.count(BEGIN)
            cell.source = strip_solutions(cell.source, f"{name} cell {i}")
            cell.outputs, cell.execution_count = [], None
    if n_regions == 0:
        raise ValueError(f"{name} has no '{BEGIN}' region: nothing to turn into an exercise")
    banner = nbformat.v4.new_markdown_cell(BANNER.format(name=name))
    banner.id = "generated-banner"
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, banner)
    return nb


def render(solution_path: Path) -> str:
    import nbformat

    nb = nbformat.read(solution_path, as_version=4)
    return nbformat.writes(make_exercise(nb, solution_path.name)) + "\n"


def solution_paths(root: Path = ROOT) -> list[Path]:
    paths = sorted(p for p in (root / "solutions").glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))
    if not paths:
        raise FileNotFoundError(f"no solutions/NN_*.ipynb under {root}")
    return paths


def build(root: Path = ROOT, write: bool = True) -> list[Path]:
    """Write (or, with write=False, only compare) every exercise; return the paths that changed."""
    changed = []
    for sol in solution_paths(root):
        target = root / "exercises" / sol.name
        text = render(sol)
        if not target.exists() or target.read_text() != text:
            changed.append(target)
            if write:
                target.parent.mkdir(exist_ok=True)
                target.write_text(text)
    return changed


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minipeft.course.exercises")
    p.add_argument("command", choices=("build", "check"))
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = p.parse_args(argv)
    changed = build(args.root, write=args.command == "build")
    if args.command == "check" and changed:
        sys.exit("out of date (run `python -m minipeft.course.exercises build`): " + ", ".join(map(str, changed)))
    print(("wrote " if args.command == "build" else "up to date: ")
          + (", ".join(map(str, changed)) if changed else "nothing changed"))


if __name__ == "__main__":
    main()
