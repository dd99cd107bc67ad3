"""Every number a lesson's prose states comes from somewhere the learner can see.

The rule (the course's quality bar): each decimal number (0.81, 1.5), percentage (12%, 0.33%), ratio (1.11×, 4×)
and p-value in a markdown cell of ``notebooks/*.ipynb`` must appear in

1. the notebook's own outputs (stream, text/plain, text/markdown, text/html), or
2. a ``results/`` file the notebook reads (found from its code cells' source, see ``results_files_read``), or
3. a *cited box*: a markdown blockquote (lines starting with ``>``) that names its source, an author and a year
   ("Hu et al. 2021", "Li & Liang 2021", "Houlsby et al. (2019)").

Whole numbers without % or × (counts, years, lesson numbers) are not checked; neither are LaTeX maths ($...$: a
formula's constants), section and arXiv numbers (§7.2, arXiv 2106.09685), version strings (2.13.0), link targets,
numbers glued to a letter or underscore (e5, W_1.5), a product written with spaces (30,522 × 384: a ratio is
written 1.11×), nor the 95% of "95% interval" (a convention, not a measurement).

Matching (``found``): a prose number with k decimals matches a source number that rounds to it at k decimals
(0.81 matches 0.810 and 0.8123; 1.11× matches 1.11 and 1.108); signs are ignored (−0.3 points matches -0.3).
Percentages and points are scaled: a percentage, a number followed by "points" and any number ≥ 10 also match
100 × a source number (12% and 2.5 points match 0.12 and 0.025; accuracy 79.0 matches 0.790), and a count in
millions (22.7M, 22.7 M) matches a source count / 10⁶. A plain decimal below 10 is matched as printed (2.7 does not
match 0.027). A JSON
record contributes its scalar numbers, not long arrays (predictions, per-step losses): a 0.81 in prose must not be
"found" among 1,000 losses. A cited box names an author ("et al.", "Li & Liang", "Houlsby and ...") or a year.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# prose numbers: a decimal, or a whole number followed by % or ×; not a version (1.2.3), not glued to a letter
PROSE_NUMBER = re.compile(r"(?<![\w.,\d/])(\d+(?:,\d{3})*(?:\.\d+)?)(?![\d.]*\.\d)(%| %|×| ?M\b| points?\b)?")
# source numbers: plain or scientific, thousands separators allowed
SOURCE_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
CITATION = re.compile(r"et al\.|[A-Z][\w-]+ (?:and|&) [A-Z][\w-]+|\b(?:19|20)\d\d\b")
CONVENTIONS = re.compile(r"95\s?% (?:[\w*-]+ ){0,2}(?:interval|confidence|CI|half-width)")
NOT_CHECKED = re.compile(r"\]\([^)]*\)"  # link targets
                         r"|\$\$.*?\$\$|\$[^$]*\$"  # LaTeX maths
                         r"|§[\d.]+(?:\s?[-–]\s?§?[\d.]+)?"  # section numbers, §3.1–3.2
                         r"|arXiv:?\s?\d{4}\.\d{4,5}", re.S)
LONG_ARRAY = 20

# what a lab function called in a code cell reads (relative to results/); "{task}" = each task named in the call
READERS = {
    "recorded_runs": ["{task}/comparison.json"],
    "recorded_difference": ["question/comparison.json", "topic/comparison.json"],
    "load_all": ["*/comparison.json", "costs.json"],
}
RESULTS_PATH = re.compile(r"results/([\w./*-]+)")


def cells(nb: dict, kind: str):
    return [c for c in nb["cells"] if c["cell_type"] == kind]


def results_files_read(nb: dict) -> list[Path]:
    """The results/ files the notebook's code reads: path strings ('../results/fusion/transfer.json': that file;
    a folder: every file in it) and the lab readers of ``READERS`` (called with a task name where they take one)."""
    code = "\n".join("".join(c["source"]) for c in cells(nb, "code"))
    patterns = set()
    for m in RESULTS_PATH.finditer(code):
        patterns.add(m.group(1).rstrip("/."))
    for function, files in READERS.items():
        for call in re.finditer(rf"{function}\((.*)", code):  # the call's line
            tasks = re.findall(r"['\"](\w+)['\"]", call.group(1))
            for f in files:
                patterns.update(f.format(task=t) for t in tasks) if "{task}" in f else patterns.add(f)
    found = set()
    for p in patterns:
        for path in (ROOT / "results").glob(p):
            found.update(q for q in ([path] if path.is_file() else path.rglob("*")) if q.is_file())
    return sorted(q for q in found if q.suffix in (".json", ".md", ".txt"))


def json_scalars(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from json_scalars(v)
    elif isinstance(value, list):
        if sum(isinstance(v, (int, float)) for v in value) <= LONG_ARRAY:
            for v in value:
                yield from json_scalars(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield float(value)
    elif isinstance(value, str):
        yield from numbers_in(value)


def numbers_in(text: str):
    for m in SOURCE_NUMBER.finditer(text):
        yield float(m.group().replace(",", ""))


def output_text(nb: dict) -> str:
    parts = []
    for c in cells(nb, "code"):
        for o in c.get("outputs", []):
            if o["output_type"] == "stream":
                parts.append("".join(o["text"]))
            for mime in ("text/plain", "text/markdown", "text/html"):
                parts.append("".join(o.get("data", {}).get(mime, "")))
    return "\n".join(parts)


def source_numbers(nb: dict) -> list[float]:
    values = list(numbers_in(output_text(nb)))
    for path in results_files_read(nb):
        text = path.read_text()
        values.extend(json_scalars(json.loads(text)) if path.suffix == ".json" else numbers_in(text))
    return values


def uncited(markdown: str) -> str:
    """The markdown without its cited boxes (blockquotes naming an author and year) and link targets."""
    kept, box = [], []
    for line in markdown.splitlines() + [""]:
        if line.lstrip().startswith(">"):
            box.append(line)
            continue
        if box and not CITATION.search("\n".join(box)):
            kept.extend(box)
        box = []
        kept.append(line)
    return CONVENTIONS.sub("", NOT_CHECKED.sub(" ", "\n".join(kept)))


def prose_numbers(markdown: str):
    """(as written, value, decimals, unit) for each checked number of the markdown (unit: "%", "×", "M", "points"
    or "")."""
    for m in PROSE_NUMBER.finditer(uncited(markdown)):
        digits, unit = m.group(1).replace(",", ""), (m.group(2) or "").strip()
        unit = "points" if unit.startswith("point") else unit
        if "." not in digits and unit not in ("%", "×"):
            continue  # a whole number: a count, a year, a lesson number
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        yield m.group(0), float(digits), decimals, unit


def found(value: float, decimals: int, unit: str, sources: list[float]) -> bool:
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    hundred = unit in ("%", "points") or value >= 10  # a share or accuracy in points may be printed as a fraction
    scales = (1,) + ((100,) if hundred else ()) + ((1e-6,) if unit == "M" else ())
    return any(abs(abs(s) * k - value) <= tolerance for s in sources for k in scales)


def untraced(nb: dict) -> list[str]:
    sources = source_numbers(nb)
    missing = []
    for c in cells(nb, "markdown"):
        for written, value, decimals, unit in prose_numbers("".join(c["source"])):
            if not found(value, decimals, unit, sources):
                missing.append(f"cell {c.get('id')}: {written!r}")
    return missing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_number_in_the_prose_is_traced(path):
    nb = json.loads(path.read_text())
    missing = untraced(nb)
    assert not missing, (f"{path.name}: numbers in markdown found in no output, no results/ file it reads "
                         f"({[str(p.relative_to(ROOT)) for p in results_files_read(nb)]}) and no cited box:\n  "
                         + "\n  ".join(missing))


def test_the_rule_catches_a_changed_number():
    """The test can fail: a traced number of lesson 04's prose, changed in its last digit to a value no source has,
    is reported with its cell id."""
    nb = json.loads((ROOT / "notebooks" / "04_parallel_adapters.ipynb").read_text())
    sources = source_numbers(nb)
    for c in cells(nb, "markdown"):
        for written, value, decimals, unit in prose_numbers("".join(c["source"])):
            if decimals == 0 or not found(value, decimals, unit, sources):
                continue
            digits = written.rstrip("%×M ").strip()
            for step in (7, 3, 9, 1):
                changed = f"{value + step * 10 ** -decimals:.{decimals}f}"
                if not found(float(changed), decimals, unit, sources):
                    c["source"] = "".join(c["source"]).replace(digits, changed, 1)
                    assert f"cell {c['id']}: {written.replace(digits, changed)!r}" in untraced(nb)
                    return
    pytest.fail("lesson 04's prose has no traced decimal number to change")


def test_matching_rules():
    assert found(0.81, 2, "", [0.8104])
    assert found(0.81, 2, "", [0.810])
    assert found(12, 0, "%", [0.12])
    assert found(79.0, 1, "", [0.790])  # accuracy in points
    assert found(2.5, 1, "points", [0.025])
    assert not found(2.7, 1, "", [0.027])  # a plain decimal below 10 is not a fraction × 100
    assert found(1.11, 2, "×", [1.108])
    assert found(0.3, 1, "", [-0.3])
    assert found(22.7, 1, "M", [22_713_216])
    assert not found(0.81, 2, "", [0.82, 0.8151, 0.0082])
    assert not found(22.7, 1, "", [22_713_216])  # millions only where the prose says M
    box = "> Hu et al. 2021, Table 4: LoRA r=8 reaches 91.3.\n\nWe measured 0.81."
    assert [w for w, *_ in prose_numbers(box)] == ["0.81"]
    assert [w for w, *_ in prose_numbers("> a quote without a source: 91.3")] == ["91.3"]
    assert [w for w, *_ in prose_numbers("torch 2.13.0, 3 seeds, a 95% interval, 1.5×, 12 %")] == ["1.5×", "12 %"]
    assert not list(prose_numbers("its 95% paired-bootstrap interval, a 95% *t* interval"))
    assert list(prose_numbers("about ±2.5 points"))[0][3] == "points"
    assert [w for w, *_ in prose_numbers("$\\pm 1.96$ (§7.2, arXiv 2106.09685), 30,522 × 384, 4× and 22.7 M")] == [
        "4×", "22.7 M"]
