"""`make lab`, kernel side: lesson 00's explorer cell, run in a real Jupyter kernel, builds the ipywidgets
explorer (not the static fallback), and the widget answers a change of method. The browser side (JupyterLab
in headless Chromium rendering the same widget) is docs/check_lab.py; its screenshot is docs/lesson00_explorer.png.
"""
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

from minipeft.course.widgets import RUN_THIS_CELL

nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
LESSON = ROOT / "notebooks" / "00_setup_and_baselines.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# A learner picks LoRA in the method dropdown: the kernel-side handler must redraw the counts.
PICK_LORA = """
import ipywidgets as w
from ipywidgets.widgets.widget import _instances
method = next(v for v in _instances.values() if isinstance(v, w.Dropdown) and v.description == "method")
method.value = "lora"
"""


def _explorer_cell() -> str:
    cells = nbformat.read(LESSON, as_version=4).cells
    found = [c.source for c in cells if c.cell_type == "code" and "explore(" in c.source
             and "minipeft.course.widgets" in c.source]
    assert found, f"{LESSON.name} has no cell that imports minipeft.course.widgets and calls explore()"
    return found[0]


def _states(client) -> dict:
    """model_id -> state, as the kernel's comm messages left them (what JupyterLab's widget manager receives)."""
    return {mid: s["state"] if "state" in s else s for mid, s in client.widget_state.items()}


def test_explorer_cell_builds_the_widget_in_a_kernel(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_explorer_cell()),
                                         nbformat.v4.new_code_cell(PICK_LORA)])
    env = {k: v for k, v in os.environ.items() if k != "MINIPEFT_STATIC"}  # a lab kernel is not static
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    first = nb.cells[0].outputs
    assert not [o for o in first if o.output_type == "error"], first
    views = [o for o in first if o.output_type == "display_data" and WIDGET_VIEW in o.data]
    assert len(views) == 1, "explore() in a kernel must display one widget (got the static fallback?)"
    # where no widget can be drawn (not run, no saved state), one line says what to do, not "VBox(children=...)"
    assert views[0].data["text/plain"] == RUN_THIS_CELL
    tables = [o.data["text/markdown"] for o in first if o.output_type == "display_data" and "text/markdown" in o.data]
    assert tables and tables[0].startswith("| method | size | trainable |")  # a Markdown table above the widget

    states = _states(client)
    root = states[views[0].data[WIDGET_VIEW]["model_id"]]
    assert root["_model_name"] == "VBoxModel"
    by_model = {}
    for s in states.values():
        by_model.setdefault(s["_model_name"], []).append(s)
    dropdowns = {s["description"]: s for s in by_model["DropdownModel"]}
    assert set(dropdowns) == {"method", "backbone"}
    methods = dropdowns["method"]["_options_labels"]
    assert {"houlsby", "lora", "prefix"} <= set(methods)
    assert methods[dropdowns["method"]["index"]] == "lora"  # the second cell's pick reached the front end's model
    assert dropdowns["backbone"]["_options_labels"] == ["MiniLM-L6", "BERT-base"]
    slider = by_model["SelectionSliderModel"][0]
    assert slider["description"] == "rank r" and slider["_options_labels"][slider["index"]] == "8"

    # the Output widget holds the redrawn breakdown: LoRA r=8 on W_q, W_v of MiniLM = 73,728 + the 770-parameter head
    out = by_model["OutputModel"][0]["outputs"]
    shown = "".join(o.get("text", "") for o in out)
    assert "lora on MiniLM-L6 (rank r = 8): trainable parameters" in shown, shown
    assert "74,498" in shown, shown
    assert any("image/png" in o.get("data", {}) for o in out), "the per-layer bar chart is missing"
    json.dumps(states)  # what JupyterLab would save in the notebook's widget metadata is plain JSON
