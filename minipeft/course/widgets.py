"""An interactive parameter explorer: pick a method and its size, see what it trains, per layer and in all.

    from minipeft.course.widgets import explore
    explore()            # ipywidgets in Jupyter; a printed table in a terminal, under nbval, or static=True

Registry-driven and exact: every method's recipe (``minipeft.core.RECIPES``, registered in the method's own file)
is applied to a task model built on the meta device (no memory, no weights), and the explorer counts ``numel`` of
what then trains, per block. The closed forms (e.g. Houlsby's 2L(2md + d + m)) are checked against the same
``numel`` in the tests and the lessons.
"""
from __future__ import annotations

import os
import re

import torch

from ..backbones.encoder import Encoder, EncoderConfig
from ..api import apply_recipe
from ..core import RECIPES, in_lesson_order
from ..lab.train import SequenceClassifier

BACKBONES = {
    "MiniLM-L6": EncoderConfig.minilm(),
    "BERT-base": EncoderConfig(name="BERT-base"),
}
NUM_LABELS = 2  # the head every method trains too (sentiment)


def _block(path: str) -> str:
    """The explorer's label for a parameter: embeddings, layer i, head, or the module that holds it."""
    layer = re.search(r"layers\.(\d+)\.", path)
    if layer:
        return f"layer {layer.group(1)}"
    parts = path.split(".")
    return {"embed": "embeddings", "head": "head"}.get(parts[1] if parts[0] == "encoder" else parts[0],
                                                       ".".join(parts[1:3]))


def breakdown(method: str, size=None, cfg: EncoderConfig | str = "MiniLM-L6", num_labels: int = NUM_LABELS) -> dict:
    """Per-block and total trainable parameters of ``method`` at ``size``, and % of the backbone."""
    if isinstance(cfg, str):
        if cfg not in BACKBONES:
            raise ValueError(f"unknown backbone {cfg!r}; allowed: {sorted(BACKBONES)} or an EncoderConfig")
        cfg = BACKBONES[cfg]
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; in the explorer: {sorted(RECIPES)}")
    recipe, knob = RECIPES[method], RECIPES[method].knob
    if knob is None and size is not None:
        raise ValueError(f"{method} has no size to choose (got {size!r}); leave size=None")
    if knob is not None:
        size = knob.default if size is None else size
        if size not in knob.sizes:
            raise ValueError(f"{method}: {knob.name} must be one of {knob.sizes}, got {size!r}")
    with torch.device("meta"):
        model = SequenceClassifier(Encoder(cfg), num_labels)
        base = model.encoder.bare_parameter_count()
        apply_recipe(model, recipe, size)
    per_layer: dict[str, int] = {}
    for path, p in model.named_parameters():
        if p.requires_grad:
            per_layer[_block(path)] = per_layer.get(_block(path), 0) + p.numel()
    total = sum(per_layer.values())
    return {"method": method, "size_name": knob.name if knob else "", "size": size, "backbone": cfg.name,
            "per_layer": per_layer, "total": total, "backbone_params": base, "pct": 100 * total / base,
            "note": recipe.description}


def format_breakdown(b: dict) -> str:
    width = max(len(k) for k in b["per_layer"])
    size = f" ({b['size_name']} = {b['size']})" if b["size_name"] else ""
    lines = [f"{b['method']} on {b['backbone']}{size}: trainable parameters"]
    lines += [f"  {k:<{width}}  {v:>13,}" for k, v in b["per_layer"].items()]
    lines.append(f"  {'total':<{width}}  {b['total']:>13,}  = {b['pct']:.4g}% of the backbone "
                 f"({b['backbone_params']:,})")
    return "\n".join(lines)


def summary_table(cfg: EncoderConfig | str = "MiniLM-L6") -> str:
    """Every registered method at its default size: total trainable and % of the backbone."""
    rows = [breakdown(m, None, cfg) for m in in_lesson_order(ablations=True)]
    out = [f"| method | size | trainable | % of {rows[0]['backbone']} |", "|---|---|---:|---:|"]
    out += [f"| {r['method']} | {r['size_name'] + ' = ' + str(r['size']) if r['size_name'] else '—'} | "
            f"{r['total']:,} | {r['pct']:.4g} |" for r in rows]
    return "\n".join(out)


def _plot(b: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.bar(list(b["per_layer"]), list(b["per_layer"].values()), color="tab:blue")
    ax.set_ylabel("trainable params")
    ax.set_title(f"{b['method']}: {b['total']:,} = {b['pct']:.3g}% of {b['backbone']}")
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    plt.show()


def has_widget_frontend() -> bool:
    """True in a Jupyter kernel with ipywidgets, unless MINIPEFT_STATIC=1 (a terminal has no front end)."""
    if os.environ.get("MINIPEFT_STATIC", "") == "1":
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


# what a notebook shows for the widget where no widget can be drawn (the kernel not run yet, no saved widget state)
RUN_THIS_CELL = "▶ Run this cell to open the parameter explorer (it needs a running kernel)."


def explore(backbone: str = "MiniLM-L6", static: bool | None = None) -> None:
    """Show the summary table; then the widget (Jupyter) or each method's default breakdown (static, printed)."""
    if static if static is not None else not has_widget_frontend():
        print(summary_table(backbone))
        for m in in_lesson_order(ablations=True):
            print("\n" + format_breakdown(breakdown(m, None, backbone)))
        return None
    import ipywidgets as w
    from IPython.display import display

    table = summary_table(backbone)
    display({"text/markdown": table, "text/plain": table}, raw=True)  # rendered as a table; text where it cannot be

    method = w.Dropdown(options=[m for m in in_lesson_order(ablations=True) if RECIPES[m].knob], description="method")
    knob = RECIPES[method.value].knob
    size = w.SelectionSlider(options=list(knob.sizes), value=knob.default, description=knob.name,
                             style={"description_width": "initial"})
    model = w.Dropdown(options=list(BACKBONES), value=backbone, description="backbone")
    out = w.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            b = breakdown(method.value, size.value, model.value)
            print(format_breakdown(b))
            _plot(b)

    def on_method(_):
        knob = RECIPES[method.value].knob
        size.unobserve(redraw, "value")
        size.options, size.value, size.description = list(knob.sizes), knob.default, knob.name
        size.observe(redraw, "value")
        redraw()

    method.observe(on_method, "value")
    size.observe(redraw, "value")
    model.observe(redraw, "value")
    box = w.VBox([w.HBox([method, model]), size, out])
    view = box._repr_mimebundle_()  # the widget view, with a one-line note instead of "VBox(children=...)"
    view["text/plain"] = RUN_THIS_CELL
    display(view, raw=True)
    redraw()
    return None
