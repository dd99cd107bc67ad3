"""Figures for the lessons: where each method sits in a transformer layer, and accuracies with their spread.

    placement_figure(["houlsby", "lora", "prefix"])   one post-LN (BERT) layer per row, the method in colour
    binomial_halfwidth(acc, n)                         half-width of a 95% interval for one accuracy on n examples
    errorbar_accuracy(ax, xs, accs, n)                 accuracies with those intervals as error bars
    method_colour("lora r=8")                          the one colour of a method in every plot of the course

What the drawings show, with their sources:

- **Houlsby adapter** (Houlsby et al. 2019, §2.1 and Fig. 2): two adapters per layer, after the attention's output
  projection and after the FFN, each *before* the residual add and LayerNorm: ``LN(x + A(h))``.
- **Pfeiffer adapter** (Pfeiffer et al. 2021, "AdapterFusion", §3; AdapterHub's ``seq_bn``): one adapter per
  layer, reading the FFN's Add & Norm output, its result sent through the same LayerNorm again.
- **LoRA** (Hu et al. 2021, §4.1-4.2): a low-rank ΔW = (α/r)·BA beside the frozen W_q and W_v; linear, so it
  can be merged into W.
- **parallel adapter** (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", §3.3,
  Fig. 1): the same bottleneck MLP, reading the sublayer's *input* x', its output s·A(x') added beside the FFN.
- **prefix tuning** (Li & Liang 2021, §4.2): l trainable key and value vectors P_k, P_v prepended to the keys
  and values of the attention in *every* layer; the queries and the real tokens are unchanged.
- **after the whole layer**: an adapter applied to the layer's output, as in a common code sketch
  (``x = layer(x); x = adapter(x)``); not where Houlsby et al. or Pfeiffer et al. put it.

The drawings use matplotlib patches only; nothing here is needed to train or run a model.
"""
from __future__ import annotations

import math

XLIM, YLIM = (-0.4, 14.9), (-2.0, 2.4)
FROZEN, TRAINED, EDGE = "#e8e8e8", "#f4a261", "#555555"
METHODS = ("base", "houlsby", "pfeiffer", "lora", "parallel", "prefix", "after_layer")
TITLES = {
    "base": "the frozen layer (post-LN, as BERT / MiniLM): nothing attached",
    "houlsby": "Houlsby et al. 2019: two adapters per layer, before each residual + LayerNorm",
    "pfeiffer": "Pfeiffer et al. 2021: one adapter per layer, after the FFN's Add & Norm, through the same LN again",
    "lora": "LoRA (Hu et al. 2021): ΔW = (α/r)·BA beside W_q and W_v (mergeable into W)",
    "parallel": "parallel adapter (He et al. 2022): reads the FFN's input x', adds s·A(x') beside the FFN",
    "prefix": "prefix tuning (Li & Liang 2021): l trained keys/values in front of K and V, in every layer",
    "after_layer": "a common code sketch: one adapter after the whole layer (not Houlsby's or Pfeiffer's place)",
}


# one colour per method in every plot of the course (matplotlib's tab20 and named colours); a lesson's variant of a
# method ("lora r=8", "houlsby k=24", "compacter lr=0.01") takes its method's colour unless it is listed itself
METHOD_COLOURS = {
    "full": "black", "head": "tab:gray", "zero-shot": "tab:gray",
    "houlsby": "tab:blue", "pfeiffer": "tab:cyan", "sequential_pfeiffer": "tab:cyan",
    "lora": "tab:orange", "lora r=1": "#ffbb78", "adapter_lora": "#c49c94",
    "phm_adapter": "#aec7e8", "compacter": "tab:purple", "compacter_pp": "#c5b0d5",
    "parallel": "tab:green", "parallel_s1": "tab:green", "scaled_parallel": "tab:olive", "scaled_s4": "tab:olive",
    "scaled_learned": "tab:brown", "sequential_ffn": "navy", "parallel_attn": "#98df8a",
    "prefix": "tab:red", "flat": "#ff9896", "prefix flat": "#ff9896", "mam": "tab:pink", "fusion": "#8c564b",
    "ia3": "goldenrod", "dora": "#8c2d04", "bitfit": "teal", "prompt_tuning": "indigo", "qlora": "#fdae6b",
}


def method_colour(name: str) -> str:
    """The colour of ``name`` in every plot: its own entry of ``METHOD_COLOURS``, else its method's (the name's first
    word: "lora r=8" -> lora), else a neutral dark grey."""
    for key in (name, name.split()[0] if name.split() else name, name.split("_")[0]):
        if key in METHOD_COLOURS:
            return METHOD_COLOURS[key]
    return "#444444"


def binomial_halfwidth(acc: float, n: int, z: float = 1.96) -> float:
    """Half-width of the normal-approximation interval acc ± z·sqrt(acc(1 − acc)/n) (95% for z = 1.96).

    One run's accuracy on n test examples is a binomial proportion; this is its sampling noise only (not the
    spread over seeds, which comes on top)."""
    if n < 1:
        raise ValueError(f"n must be a positive number of examples, got {n!r}")
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"an accuracy is in [0, 1], got {acc!r}")
    return z * math.sqrt(acc * (1.0 - acc) / n)


def errorbar_accuracy(ax, xs, accs, n: int, z: float = 1.96, **kwargs):
    """Plot accuracies at ``xs`` with their binomial intervals (n test examples each) as error bars."""
    kwargs.setdefault("fmt", "o")
    kwargs.setdefault("capsize", 3)
    return ax.errorbar(list(xs), list(accs), yerr=[binomial_halfwidth(a, n, z) for a in accs], **kwargs)


# ---- the placement drawings ---------------------------------------------------------------------------------

def _box(ax, x, y, w, h, text, color=FROZEN, fontsize=8, **kw):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor=EDGE, lw=1, **kw))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, color=EDGE, style="-|>", ls="-", lw=1.0, connection="arc3"):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=color, lw=lw, ls=ls,
                                                          shrinkA=0, shrinkB=0, connectionstyle=connection))


def _plus(ax, x, y):
    from matplotlib.patches import Circle

    ax.add_patch(Circle((x, y), 0.22, facecolor="white", edgecolor=EDGE, lw=1))
    ax.text(x, y, "+", ha="center", va="center", fontsize=10)


def draw_layer(ax, method: str = "base") -> None:
    """Draw one post-LN transformer layer on ``ax`` with ``method`` (one of ``METHODS``) in colour."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    h = 0.55
    # the frozen layer, left to right: x -> q,k,v -> attention -> W_o -> + -> LN -> W_in -> GELU -> W_out -> + -> LN
    ax.text(0.0, 0.0, "x", ha="center", va="center", fontsize=11)
    for dy, name in ((0.85, "W_q"), (0.0, "W_k"), (-0.85, "W_v")):
        _box(ax, 1.3, dy, 0.8, h, name)
        _arrow(ax, (0.25, 0.0), (0.9, dy))
        _arrow(ax, (1.7, dy), (2.35, 0.0 if dy == 0 else dy * 0.35))
    _box(ax, 3.05, 0.0, 1.4, 1.5, "softmax\n(QKᵀ/√dₕ)V\nper head", fontsize=7)
    _box(ax, 4.3, 0.0, 0.7, h, "W_o")
    _arrow(ax, (3.75, 0.0), (3.95, 0.0))
    _plus(ax, 5.75, 0.0)
    _box(ax, 6.55, 0.0, 0.8, h, "LN")
    _arrow(ax, (5.97, 0.0), (6.15, 0.0))
    ax.text(7.2, 0.18, "x'", ha="center", fontsize=10)
    _box(ax, 7.95, 0.0, 0.8, h, "W_in")
    _box(ax, 8.95, 0.0, 0.7, h, "GELU")
    _box(ax, 9.95, 0.0, 0.8, h, "W_out")
    _arrow(ax, (6.95, 0.0), (7.55, 0.0)), _arrow(ax, (8.35, 0.0), (8.6, 0.0)), _arrow(ax, (9.3, 0.0), (9.55, 0.0))
    _plus(ax, 11.45, 0.0)
    _box(ax, 12.25, 0.0, 0.8, h, "LN")
    _arrow(ax, (11.67, 0.0), (11.85, 0.0))
    ax.text(13.55, 0.0, "out", ha="center", va="center", fontsize=10)
    # residual connections (above the line)
    top = 2.0
    ax.plot([0.0, 0.0], [0.2, top], color=EDGE, lw=1)
    ax.plot([0.0, 5.75], [top, top], color=EDGE, lw=1)
    _arrow(ax, (5.75, top), (5.75, 0.22))
    ax.plot([7.2, 7.2], [0.0, top], color=EDGE, lw=1)
    ax.plot([7.2, 11.45], [top, top], color=EDGE, lw=1)
    _arrow(ax, (11.45, top), (11.45, 0.22))
    ax.text(3.6, top + 0.1, "residual", fontsize=7, color=EDGE, ha="center")
    ax.text(9.3, top + 0.1, "residual", fontsize=7, color=EDGE, ha="center")

    # the output of each sublayer (h) into its "+": directly, or through a sequential adapter
    if method == "houlsby":
        for x_adapter, x_from, x_plus in ((5.05, 4.65, 5.53), (10.8, 10.35, 11.23)):
            _box(ax, x_adapter, 0.0, 0.5, h, "A", color=TRAINED, fontsize=9)
            _arrow(ax, (x_from, 0.0), (x_adapter - 0.25, 0.0)), _arrow(ax, (x_adapter + 0.25, 0.0), (x_plus, 0.0))
        ax.text(5.05, -0.55, "h + A(h)", ha="center", fontsize=7)
        ax.text(10.8, -0.55, "h + A(h)", ha="center", fontsize=7)
    else:
        _arrow(ax, (4.65, 0.0), (5.53, 0.0))
        _arrow(ax, (10.35, 0.0), (11.23, 0.0))
        ax.text(5.05, 0.1, "h", ha="center", fontsize=9)
        ax.text(10.8, 0.1, "h", ha="center", fontsize=9)
    if method == "pfeiffer":
        _box(ax, 11.85, -1.35, 0.6, h, "A", color=TRAINED, fontsize=9)
        _arrow(ax, (12.25, -0.28), (12.0, -1.07))
        _arrow(ax, (11.6, -1.2), (11.45, -0.22))
        ax.text(12.85, -1.35, "A(LN(x'+h)),\nthen the same LN", fontsize=7, va="center")
    elif method == "lora":
        for dy in (1.45, -1.45):
            _box(ax, 1.3, dy, 0.9, 0.45, "(α/r)BA", color=TRAINED, fontsize=7)
        ax.text(3.9, -1.45, "W_q x + (α/r)BA x (same for W_v);\nmerged after training: W = W₀ + (α/r)BA",
                fontsize=7, va="center")
    elif method == "parallel":
        _box(ax, 8.95, -1.35, 1.2, h, "s·A(x')", color=TRAINED, fontsize=9)
        ax.plot([7.2, 7.2], [0.0, -1.35], color=EDGE, lw=1)
        _arrow(ax, (7.2, -1.35), (8.35, -1.35))
        ax.plot([9.55, 11.45], [-1.35, -1.35], color=EDGE, lw=1)
        _arrow(ax, (11.45, -1.35), (11.45, -0.22))
        ax.text(11.55, -0.85, "h + s·A(x')", fontsize=7)
    elif method == "prefix":
        for x_p, name in ((2.65, "P_k"), (3.45, "P_v")):
            _box(ax, x_p, -1.45, 0.6, 0.45, name, color=TRAINED, fontsize=7)
            _arrow(ax, (x_p, -1.22), (x_p, -0.75))
        ax.text(3.95, -1.45, "l trained keys and values in front of the T real ones: l + T keys, T queries;\n"
                "the same in every layer", fontsize=7, va="center")
    elif method == "after_layer":
        _box(ax, 13.0, -1.3, 0.6, h, "A", color=TRAINED, fontsize=9)
        _arrow(ax, (12.45, -0.28), (12.85, -1.02))
        ax.text(13.4, -1.3, "x ← A(layer(x))", fontsize=7, va="center")
    ax.set_xlim(*XLIM)
    ax.set_ylim(*YLIM)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(TITLES[method], fontsize=9, loc="left")


def placement_figure(methods=("houlsby", "pfeiffer", "lora", "parallel", "prefix"), width: float = 11.0):
    """One row per method (see ``METHODS``); grey = frozen, orange = trained. Returns the figure."""
    import matplotlib.pyplot as plt

    methods = list(methods)
    fig, axes = plt.subplots(len(methods), 1, figsize=(width, len(methods) * 1.1 * width * (YLIM[1] - YLIM[0]) / (XLIM[1] - XLIM[0])), squeeze=False)
    for ax, method in zip(axes[:, 0], methods):
        draw_layer(ax, method)
    fig.tight_layout()
    return fig


# ---- accuracies as text, with their noise ---------------------------------------------------------------------

def accuracy_text(result) -> str:
    """``"0.772 ± 0.026"``: a run's test accuracy and the half-width of its 95% binomial interval (its
    ``test_predictions`` say on how many examples it was scored)."""
    n = len(result.test_predictions) or 1
    return f"{result.test_acc:.3f} ± {binomial_halfwidth(result.test_acc, n):.3f}"


MIN_SEEDS = 3  # seeds per side before a paired difference gets a verdict (the course's rule)


def paired_text(a, b, labels) -> str:
    """A against B on the same test examples (``minipeft.lab.stats.compare``): the accuracy difference in points with
    its 95% paired-bootstrap interval, the exact McNemar p, and the verdict ("better" / "within noise" / "worse").
    ``a`` and ``b`` are a Result or a list of Results (seeds, paired in order); ``labels`` the test labels.
    A verdict needs ``MIN_SEEDS`` seeds on each side (one seed's difference can be the seed's luck, which a test on
    one seed's test examples does not see): with fewer it reads "1 seed: no verdict"."""
    from ..lab.stats import compare, correctness

    a, b = (x if isinstance(x, (list, tuple)) else [x] for x in (a, b))
    y = list(labels)[:len(a[0].test_predictions)]
    c = compare(correctness([r.test_predictions for r in a], y), correctness([r.test_predictions for r in b], y))
    seeds = min(len(a), len(b))
    verdict = c.verdict if seeds >= MIN_SEEDS else f"{seeds} seed{'s' * (seeds > 1)}: no verdict"
    return (f"{100 * c.difference:+.1f} points [{100 * c.low:+.1f}, {100 * c.high:+.1f}], McNemar p = "
            f"{c.p_mcnemar:.2g}: {verdict}")
