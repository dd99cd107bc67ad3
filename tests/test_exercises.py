"""The exercise pipeline, over every lesson: exercises/ is up to date, builds are deterministic, and every
unfilled exercise stops at its first check with NotImplementedError. (nbval runs the solutions.)"""
import re

import nbformat
import pytest

from minipeft.course.exercises import BEGIN, END, ROOT, build, render, solution_paths, strip_solutions
from minipeft.course.notebook_runner import KERNELSPEC, execute, normalise

SOLUTIONS = solution_paths()


def test_every_solution_has_an_exercise_and_exercises_are_up_to_date():
    assert build(write=False) == [], "exercises/ is stale: run `python -m minipeft.course.exercises build`"
    assert sorted(p.name for p in (ROOT / "exercises").glob("*.ipynb")) == [p.name for p in SOLUTIONS]


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_build_is_deterministic_and_strips_every_answer(path):
    text = render(path)
    assert text == render(path)
    assert "### BEGIN SOLUTION" not in text and "NotImplementedError" in text
    assert '"outputs": []' in text and '"execution_count": null' in text
    assert "check_" in text, "an exercise needs at least one check_... call"


def test_strip_solutions():
    src = "def f(x):\n    ### BEGIN SOLUTION: return x squared\n    return x * x\n    ### END SOLUTION\nf(2)"
    assert strip_solutions(src) == "def f(x):\n    raise NotImplementedError('Exercise: return x squared')\nf(2)"
    with pytest.raises(ValueError, match="never closed"):
        strip_solutions("### BEGIN SOLUTION\nx = 1", "nb cell 3")
    with pytest.raises(ValueError, match="without a ### BEGIN SOLUTION"):
        strip_solutions("x = 1\n### END SOLUTION")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_unfilled_exercise_fails_at_its_first_check(path):
    from nbclient.exceptions import CellExecutionError

    exercise = ROOT / "exercises" / path.name
    with pytest.raises(CellExecutionError) as info:
        execute(exercise, timeout=300, write=False)
    assert info.value.ename == "NotImplementedError"
    cells = info.value.notebook.cells
    failed = next(i for i, c in enumerate(cells) if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    first_check = next(i for i, c in enumerate(cells) if c.cell_type == "code" and "check_" in c.source
                       and "import" not in c.source)
    assert failed == first_check, f"{exercise.name}: failed at cell {failed}, its first check is cell {first_check}"


TIERS = ["Hint 1 — a nudge", "Hint 2 — the idea", "Hint 3 — the code (this is the answer: open it last)"]
TIERED = [p for p in SOLUTIONS if p.name[:2] in ("00", "01", "02", "03")]


def regions(source: str) -> list[str]:
    """The code lines of a cell's solution regions (comments and lines too short to be telling left out)."""
    inside, lines = False, []
    for line in source.split("\n"):
        marker = line.strip()
        inside = marker.startswith(BEGIN) or (inside and not marker.startswith(END))
        code = marker.split("  #")[0].strip()
        if inside and not marker.startswith(BEGIN) and len(code) >= 12 and not code.startswith("#"):
            lines.append(code)
    return lines


@pytest.mark.parametrize("path", TIERED, ids=lambda p: p.name)
def test_hints_are_tiered_and_only_the_last_one_gives_the_code(path):
    """Before every task a hint cell with three folded tiers; tiers 1 and 2 hold no line of the answer and no code
    block; tier 3, marked as the answer, holds all of it."""
    cells = nbformat.read(path, as_version=4).cells
    tasks = [i for i, c in enumerate(cells) if c.cell_type == "code" and BEGIN in c.source]
    assert tasks
    for i in tasks:
        hint = next(c for c in reversed(cells[:i]) if c.cell_type == "markdown")
        tiers = re.findall(r"<summary>(.*?)</summary>(.*?)</details>", hint.source, re.S)
        assert [t for t, _ in tiers] == TIERS, f"{path.name} cell {i}: hints {[t for t, _ in tiers]}"
        for line in regions(cells[i].source):
            assert line in tiers[2][1], f"{path.name} cell {i}: Hint 3 lacks {line!r}"
            assert not any(line in body for _, body in tiers[:2]), f"{path.name} cell {i}: an early hint has {line!r}"
        assert not any("```" in body for _, body in tiers[:2]), f"{path.name} cell {i}: code in Hint 1 or 2"


def test_exercises_carry_the_metadata_jupyterlab_writes():
    """An exercise opens unmodified: JupyterLab rewrites a notebook's kernelspec (and language_info) as soon as its
    kernel starts, and marks it modified if they differ (docs/check_lab.py checks it in a browser)."""
    for path in sorted((ROOT / "exercises").glob("*.ipynb")):
        metadata = nbformat.read(path, as_version=4).metadata
        assert metadata["kernelspec"] == KERNELSPEC, path.name
        assert "version" in metadata.get("language_info", {}), path.name
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                           "name": "python3"}})
    assert normalise(nb) and nb.metadata["kernelspec"] == KERNELSPEC and not normalise(nb)
