"""``python -m minipeft report``: every task's views remade by its kind (``kinds.render_task``), then the design
document's table from all records and ``costs.json`` (``report.design_markdown``), written to ``table.md``."""
from __future__ import annotations

from pathlib import Path

from ..core import RECIPES
from .kinds import render_task
from .records import by_method, check_output_dir, write_atomic
from .report import design_markdown, load_all, summary_markdown


def main(argv=None) -> str:
    """``python -m minipeft report [--results results]``: print the measured table and write ``table.md``.

    A record that cannot be read (truncated, not a record) is left out with a warning naming it, here and in
    ``table.md``: the other tasks are still reported."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m minipeft report",
                                description="the design document's table from results/ (all tasks + costs)")
    p.add_argument("--results", default="results", help="folder with <task>/comparison.json and costs.json")
    args = p.parse_args(argv)
    root = Path(args.results)
    if not root.is_dir():
        p.error(f"--results {root}: {'not a folder' if root.exists() else 'no such folder'}; it holds "
                "<task>/comparison.json, made by `make results` (python -m minipeft compare)")
    try:
        check_output_dir(root, ["table.md"])
    except ValueError as e:
        p.error(str(e))
    unreadable: dict[Path, str] = {}  # reported, not fatal: one bad file must not hide the good tasks
    records, costs = load_all(root, unreadable)
    for path, why in unreadable.items():
        print(f"warning: left out of the report: {why}", file=sys.stderr)
    for path in sorted(root.glob("*/comparison.json")):
        if path not in unreadable:
            render_task(path)
    if not records:
        p.error(f"no readable {root}/<task>/comparison.json of a classification task; make them with "
                "`make results` (python -m minipeft compare)")
    compared = {m for m, spec in RECIPES.items() if not spec.ablation}  # a column needs every compared method
    partial = {t: rec for t, rec in records.items() if not compared <= {r.method for r in rec["results"]}}
    records = {t: rec for t, rec in records.items() if t not in partial} or records
    text = design_markdown(records, costs)
    note = ("" if costs else "\nNo costs.json: run `cd bench && ../.venv/bin/python costs.py --out ../results/costs.json`.\n")
    note += "".join(f"\nNot in the table: `{t}/comparison.json` ({', '.join(by_method(rec['results']))} only).\n"
                    for t, rec in partial.items() if t not in records)
    note += "".join(f"\nNot in the table (unreadable): {why}\n" for why in unreadable.values())
    write_atomic(
        root / "table.md",
        "# The design document's table, measured\n\n## In short (the README's)\n\n" + summary_markdown(records, costs)
        + "\n## In full\n\n" + text + note + "\nMade by `python -m minipeft report` from "
        + ", ".join(f"`{t}/comparison.json`" for t in records) + (" and `costs.json`" if costs else "") + ".\n")
    print(text + note)
    return text
