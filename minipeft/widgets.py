"""An interactive parameter explorer: pick a method and its size, see what it trains, per layer and in all.

    from minipeft.widgets import explore
    explore()            # ipywidgets in Jupyter; a printed table in a terminal, under nbval, or static=True

Registry-driven: each method registers one ``ExplorerEntry`` (its size knob and a function
``per_layer(cfg, size) -> {block: trainable parameters}``). Method lessons add theirs in the
"registered methods" block at the bottom of this file (or call ``register_explorer`` from a notebook), e.g.
a Houlsby adapter, 2 per layer with bottleneck m, ``2·(2md + d + m)`` per layer (Houlsby et al. 2019)::

    register_explorer(ExplorerEntry(
        "houlsby", size_name="bottleneck m", sizes=(8, 16, 32, 64, 128, 256), default=64,
        per_layer=lambda cfg, m: with_head(cfg, {f"layer {i}": 2 * (2 * m * cfg.hidden_size + cfg.hidden_size + m)
                                                 for i in range(cfg.num_layers)})))
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .backbones.encoder import Encoder, EncoderConfig
from .train import count_parameters

BACKBONES = {
    "MiniLM-L6": EncoderConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                               name="MiniLM-L6"),
    "BERT-base": EncoderConfig(name="BERT-base"),
}
NUM_LABELS = 2  # the head every method trains too (sentiment)


@dataclass(frozen=True)
class ExplorerEntry:
    """One method in the explorer. ``per_layer(cfg, size)`` returns trainable parameters per block, labelled
    "embeddings", "layer 0" ... "layer L-1", "head" (any subset, in that order; other labels allowed)."""
    method: str
    size_name: str
    sizes: tuple
    default: object
    per_layer: Callable[[EncoderConfig, object], dict]
    note: str = ""

    def __post_init__(self):
        if not self.sizes or self.default not in self.sizes:
            raise ValueError(f"{self.method}: default size {self.default!r} must be one of sizes {self.sizes!r}")


EXPLORER: dict[str, ExplorerEntry] = {}


def register_explorer(entry: ExplorerEntry, replace: bool = False) -> ExplorerEntry:
    if entry.method in EXPLORER and not replace:
        raise ValueError(f"{entry.method!r} is already in the explorer; pass replace=True to overwrite it")
    EXPLORER[entry.method] = entry
    return entry


def backbone_parameters(cfg: EncoderConfig) -> int:
    """The denominator: the encoder alone (numel of an Encoder built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(Encoder(cfg))


def with_head(cfg: EncoderConfig, counts: dict, num_labels: int = NUM_LABELS) -> dict:
    """Add the classification head (d·C + C), which every method trains."""
    return {**counts, "head": cfg.hidden_size * num_labels + num_labels}


def breakdown(method: str, size=None, cfg: EncoderConfig | str = "MiniLM-L6") -> dict:
    """Per-block and total trainable parameters of ``method`` at ``size``, and % of the backbone."""
    if isinstance(cfg, str):
        if cfg not in BACKBONES:
            raise ValueError(f"unknown backbone {cfg!r}; allowed: {sorted(BACKBONES)} or an EncoderConfig")
        cfg = BACKBONES[cfg]
    if method not in EXPLORER:
        raise ValueError(f"unknown method {method!r}; in the explorer: {sorted(EXPLORER)}")
    entry = EXPLORER[method]
    size = entry.default if size is None else size
    if size not in entry.sizes:
        raise ValueError(f"{method}: {entry.size_name} must be one of {entry.sizes}, got {size!r}")
    per_layer = {k: int(v) for k, v in entry.per_layer(cfg, size).items()}
    total, base = sum(per_layer.values()), backbone_parameters(cfg)
    return {"method": method, "size_name": entry.size_name, "size": size, "backbone": cfg.name,
            "per_layer": per_layer, "total": total, "backbone_params": base, "pct": 100 * total / base}


def format_breakdown(b: dict) -> str:
    width = max(len(k) for k in b["per_layer"])
    lines = [f"{b['method']} on {b['backbone']} ({b['size_name']} = {b['size']}): trainable parameters"]
    lines += [f"  {k:<{width}}  {v:>13,}" for k, v in b["per_layer"].items()]
    lines.append(f"  {'total':<{width}}  {b['total']:>13,}  = {b['pct']:.4g}% of the backbone "
                 f"({b['backbone_params']:,})")
    return "\n".join(lines)


def summary_table(cfg: EncoderConfig | str = "MiniLM-L6") -> str:
    """Every registered method at its default size: total trainable and % of the backbone."""
    rows = [breakdown(m, None, cfg) for m in EXPLORER]
    out = [f"| method | size | trainable | % of {rows[0]['backbone']} |", "|---|---|---:|---:|"]
    out += [f"| {r['method']} | {r['size_name']} = {r['size']} | {r['total']:,} | {r['pct']:.4g} |" for r in rows]
    return "\n".join(out)


def _plot(b: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.bar(list(b["per_layer"]), list(b["per_layer"].values()), color="tab:blue")
    ax.set_ylabel("trainable params")
    ax.set_title(f"{b['method']} ({b['size_name']} = {b['size']}): {b['total']:,} = {b['pct']:.3g}% of {b['backbone']}")
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


def explore(backbone: str = "MiniLM-L6", static: bool | None = None) -> None:
    """Print the summary table; then show the widget (Jupyter) or each method's default breakdown (static)."""
    print(summary_table(backbone))
    if static if static is not None else not has_widget_frontend():
        for m in EXPLORER:
            print("\n" + format_breakdown(breakdown(m, None, backbone)))
        return None
    import ipywidgets as w
    from IPython.display import display

    method = w.Dropdown(options=list(EXPLORER), description="method")
    size = w.SelectionSlider(options=list(EXPLORER[method.value].sizes), value=EXPLORER[method.value].default,
                             description=EXPLORER[method.value].size_name, style={"description_width": "initial"})
    model = w.Dropdown(options=list(BACKBONES), value=backbone, description="backbone")
    out = w.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            b = breakdown(method.value, size.value, model.value)
            print(format_breakdown(b))
            _plot(b)

    def on_method(_):
        entry = EXPLORER[method.value]
        size.unobserve(redraw, "value")
        size.options, size.value, size.description = list(entry.sizes), entry.default, entry.size_name
        size.observe(redraw, "value")
        redraw()

    method.observe(on_method, "value")
    size.observe(redraw, "value")
    model.observe(redraw, "value")
    box = w.VBox([w.HBox([method, model]), size, out])
    display(box)
    redraw()
    return None


# ---- registered methods (lesson order; method lessons add theirs here) ----------------------------------------

def _full(cfg: EncoderConfig, num_labels: int) -> dict:
    """Everything: numel per block of an Encoder built on the meta device, plus the head."""
    with torch.device("meta"):
        enc = Encoder(cfg)
    counts = {"embeddings": count_parameters(enc.embed)}
    counts.update({f"layer {i}": count_parameters(layer) for i, layer in enumerate(enc.layers)})
    return with_head(cfg, counts, num_labels)


register_explorer(ExplorerEntry("full", size_name="labels C", sizes=(2, 3, 5), default=2, per_layer=_full,
                                note="full fine-tuning: every encoder parameter + the head"))
register_explorer(ExplorerEntry("head", size_name="labels C", sizes=(2, 3, 5), default=2,
                                per_layer=lambda cfg, c: with_head(cfg, {}, c),
                                note="head only: d·C + C (a linear probe on the frozen encoder)"))


def _bottleneck(per_layer_adapters: int):
    """Bottleneck adapters: 2md + d + m each (Houlsby et al. 2019, §3.1); Houlsby 2 per layer, Pfeiffer 1."""
    def per_layer(cfg: EncoderConfig, m: int) -> dict:
        from .methods.bottleneck import pfeiffer_count

        return with_head(cfg, {f"layer {i}": per_layer_adapters * pfeiffer_count(cfg.hidden_size, 1, m)
                               for i in range(cfg.num_layers)})
    return per_layer


register_explorer(ExplorerEntry("houlsby", size_name="bottleneck m", sizes=(2, 8, 16, 32, 64, 128, 256), default=32,
                                per_layer=_bottleneck(2),
                                note="Houlsby: two adapters per layer (attention and FFN outputs), 2L(2md + d + m)"))
register_explorer(ExplorerEntry("pfeiffer", size_name="bottleneck m", sizes=(2, 8, 16, 32, 48, 64, 128, 256),
                                default=64, per_layer=_bottleneck(1),
                                note="Pfeiffer: one adapter per layer (after the FFN's Add & Norm), L(2md + d + m)"))


def _lora(cfg: EncoderConfig, r: int) -> dict:
    """LoRA on W_q, W_v: r(d_in + d_out) per matrix, 4rd per layer (Hu et al. 2021, §4.1); merged: 0 extra."""
    from .methods.lora import lora_count_encoder

    per_layer = lora_count_encoder(cfg, r, ("q", "v")) // cfg.num_layers
    return with_head(cfg, {f"layer {i}": per_layer for i in range(cfg.num_layers)})


register_explorer(ExplorerEntry("lora", size_name="rank r", sizes=(1, 2, 4, 8, 16, 32, 64), default=8, per_layer=_lora,
                                note="LoRA on W_q, W_v: L·2·r(d + d); merged into the weights after training, "
                                     "so inference costs nothing extra"))


def _compacter(sites: int, rank, shared: bool, n: int = 4):
    """PHM adapters (Karimi Mahabadi et al. 2021, §3.3 + biases): per adapter two PHM layers d->k->d; Compacter
    (rank 1, one shared A: n³ once), Compacter++ (the same at the FFN only), PHM-Adapter (full B_i, own A)."""
    def per_layer(cfg: EncoderConfig, k: int) -> dict:
        from .methods.compacter import phm_adapter_count

        per = phm_adapter_count(cfg.hidden_size, 1, k, n, rank, shared, sites) - (n ** 3 if shared else 0)
        counts = {"shared A (n³)": n ** 3} if shared else {}
        return with_head(cfg, {**counts, **{f"layer {i}": per for i in range(cfg.num_layers)}})
    return per_layer


for _name, _args, _note in (
        ("phm_adapter", (2, None, False), "PHM-Adapter (n=4): Houlsby placement, W = Σ A_i ⊗ B_i, 4L(kd/n + n³) + biases"),
        ("compacter", (2, 1, True), "Compacter (n=4): B_i = s_i t_iᵀ, A shared by all layers, 4L(k + d) + n³ + biases"),
        ("compacter_pp", (1, 1, True), "Compacter++ (n=4): Compacter at the FFN only, 2L(k + d) + n³ + biases")):
    register_explorer(ExplorerEntry(_name, size_name="bottleneck k", sizes=(8, 16, 24, 32, 48, 64, 96), default=24,
                                    per_layer=_compacter(*_args), note=_note))


def _parallel(cfg: EncoderConfig, r: int) -> dict:
    """Parallel adapter on the FFN: 2rd + r + d per layer (He et al. 2022); s=4 or s=1 cost the same."""
    from .methods.parallel import parallel_count

    return with_head(cfg, {f"layer {i}": parallel_count(cfg.hidden_size, 1, r) for i in range(cfg.num_layers)})


register_explorer(ExplorerEntry("parallel", size_name="bottleneck r", sizes=(8, 16, 32, 64, 96, 128, 256, 512),
                                default=96, per_layer=_parallel,
                                note="(scaled) parallel adapter on the FFN: h ← h + s·A(x), x the FFN input; "
                                     "a fixed s adds no parameters, a learned s one per layer"))


def _prefix(cfg: EncoderConfig, l: int) -> dict:
    """Reparameterised prefix at training time: P' (l·d) + MLP (d·k + k + k·2Ld + 2Ld), k = 512 (Li & Liang §4.3)."""
    from .methods.prefix import prefix_training_count

    return with_head(cfg, {"P' + MLP (dropped after training)": prefix_training_count(cfg.hidden_size,
                                                                                      cfg.num_layers, l, 512)})


def _prefix_ejected(cfg: EncoderConfig, l: int) -> dict:
    """After ejection (or flat): P_k and P_v, l vectors of size d, per layer: 2·l·d each layer."""
    from .methods.prefix import prefix_stored_count

    return with_head(cfg, {f"layer {i}": prefix_stored_count(cfg.hidden_size, 1, l) for i in range(cfg.num_layers)})


register_explorer(ExplorerEntry("prefix", size_name="prefix length l", sizes=(5, 10, 20, 30, 50, 100, 200),
                                default=30, per_layer=_prefix,
                                note="prefix tuning, reparameterised (k=512): trained; only 2·l·d·L is kept "
                                     "(see prefix_ejected)"))
register_explorer(ExplorerEntry("prefix_ejected", size_name="prefix length l", sizes=(5, 10, 20, 30, 50, 100, 200),
                                default=30, per_layer=_prefix_ejected,
                                note="prefix after ejection (= flat prefix): 2·l·d per layer, stored and used "
                                     "at inference"))
