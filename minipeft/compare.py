"""The comparison harness: every registered method, one shared budget, one task -> results/.

    python -m minipeft compare [--task sentiment] [--seeds 0 1] [--fast] [--methods full head] [--out results]

writes ``comparison.json`` (every Result), ``comparison.md`` (a table, the command, budget and versions) and
``comparison.png`` (test accuracy vs % of the backbone trained, log x).

Adding a method (one call, in the "registered methods" block at the bottom of this file, lesson order)::

    def _prepare_lora(model):                      # model: a fresh SequenceClassifier, seeded
        add_lora(model.encoder, LoRAConfig(r=8))   # attach ...
        freeze(model, except_=("lora", "head"))    # ... and leave only the method's parameters + head trainable

    register(MethodSpec("lora", lesson="02", lr=1e-3, prepare=_prepare_lora, config={"r": 8},
                        description="LoRA r=8 on W_q, W_v (Hu et al. 2021)"))
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .train import Budget, Result, SequenceClassifier, seed_everything, train


@dataclass(frozen=True)
class MethodSpec:
    """A method as the harness runs it. ``prepare(model)`` attaches the method's modules to a fresh
    ``SequenceClassifier`` and sets ``requires_grad`` (the head normally stays trainable)."""
    name: str
    lesson: str                                   # "00".."08": where the course teaches it
    lr: float                                     # tuned for Budget.lesson()
    prepare: Callable[[SequenceClassifier], None]
    config: dict = field(default_factory=dict)    # hyperparameters, recorded in the Result
    description: str = ""

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"method name must be letters, digits, '-' or '_', got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"lr of {self.name!r} must be > 0, got {self.lr}")
        if not callable(self.prepare):
            raise TypeError(f"prepare of {self.name!r} must be a function prepare(model) -> None")


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add a method to ``METHODS`` (``replace=True`` to overwrite an existing name)."""
    if spec.name in METHODS and not replace:
        raise ValueError(f"method {spec.name!r} is already registered; pass replace=True to overwrite it")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}")
    return METHODS[name]


def build_model(spec: MethodSpec | str, task: str = "sentiment", seed: int = 0, encoder=None) -> SequenceClassifier:
    """Seed, load the pretrained encoder (or use ``encoder``), add a head for ``task``, run ``spec.prepare``."""
    from .backbones.encoder import Encoder
    from .tasks import TASKS

    spec = get_method(spec) if isinstance(spec, str) else spec
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available tasks: {sorted(TASKS)}")
    seed_everything(seed)
    model = SequenceClassifier(encoder or Encoder.from_pretrained(), num_labels=len(TASKS[task].label_names))
    spec.prepare(model)
    return model


def run_comparison(methods=None, task: str = "sentiment", seeds=(0,), budget: Budget | None = None,
                   quiet: bool = False, on_result: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Train each method (all registered ones by default) once per seed with the same budget.

    ``on_result(results_so_far)`` is called after each run (``main`` writes the files then, so a crash or an
    interrupt keeps what finished)."""
    budget = budget or Budget.from_env()
    specs = [get_method(m) for m in (methods or list(METHODS))]
    results = []
    for spec in specs:
        for seed in seeds:
            model = build_model(spec, task, seed)
            results.append(train(model, task, spec.lr, budget, seed=seed, method=spec.name,
                                 config=spec.config, quiet=quiet))
            if on_result is not None:
                on_result(results)
            if not quiet:
                r = results[-1]
                print(f"{spec.name} seed {seed}: test acc {r.test_acc:.3f}, {r.trainable_pct:.3g}% trained, "
                      f"{r.sec_per_step:.2f} s/step", flush=True)
    return results


# ---- writing results/ ----------------------------------------------------------------------------------------

def summarise(results: list[Result]) -> list[dict]:
    """One row per method: mean (and std over seeds) of the numbers, in the order they were run."""
    rows: dict[str, list[Result]] = {}
    for r in results:
        rows.setdefault(r.method, []).append(r)

    def ms(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    out = []
    for name, rs in rows.items():
        spec = METHODS.get(name)
        out.append({"method": name, "lesson": spec.lesson if spec else "", "lr": rs[0].lr, "seeds": len(rs),
                    "trainable": rs[0].trainable_params, "stored": rs[0].stored_params,
                    "trainable_pct": rs[0].trainable_pct, "stored_pct": rs[0].stored_pct,
                    "val_acc": ms([r.val_acc[-1] for r in rs]), "test_acc": ms([r.test_acc for r in rs]),
                    "sec_per_step": statistics.median([r.sec_per_step for r in rs]),
                    "peak_memory_mb": max(r.peak_memory_mb for r in rs), "train_state_mb": rs[0].train_state_mb})
    return out


def markdown_table(results: list[Result]) -> str:
    head = ("| method | lesson | lr | trainable | % of backbone | stored | val acc | test acc | s/step "
            "| peak mem (MiB) | weights+grads+AdamW (MiB) |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    pm = lambda m_s: f"{m_s[0]:.3f}" + (f" ± {m_s[1]:.3f}" if m_s[1] else "")  # noqa: E731
    return head + "".join(
        f"| {r['method']} | {r['lesson']} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_pct']:.3g} "
        f"| {r['stored']:,} | {pm(r['val_acc'])} | {pm(r['test_acc'])} | {r['sec_per_step']:.2f} "
        f"| {r['peak_memory_mb']:.0f} | {r['train_state_mb']:.0f} |\n" for r in summarise(results))


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in summarise(results):
        (m, s), x = row["test_acc"], row["trainable_pct"]
        ax.errorbar([x], [m], yerr=[s] if s else None, fmt="o", capsize=3, label=row["method"])
        ax.annotate(row["method"], (x, m), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.set_xlabel("trainable parameters, % of the frozen backbone (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results[0].task}: accuracy vs parameters trained")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: list[Result], out_dir, command: str, planned: int | None = None) -> dict[str, Path]:
    """Write comparison.json / .md / .png into ``out_dir``; return their paths.

    ``planned``: the number of runs the command was to make; when fewer finished, the files say so."""
    if not results:
        raise ValueError("no results to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"comparison.{k}" for k in ("json", "md", "png")}
    r0 = results[0]
    partial = planned is not None and len(results) < planned
    status = f"partial: {len(results)} of {planned} runs finished" if partial else "complete"
    paths["json"].write_text(json.dumps({"command": command, "status": status, "task": r0.task, "budget": r0.budget,
                                         "versions": r0.versions, "results": [r.to_dict() for r in results]},
                                        indent=1) + "\n")
    budget = ", ".join(f"{k}={v}" for k, v in r0.budget.items())
    versions = ", ".join(f"{k} {v}" for k, v in r0.versions.items())
    paths["md"].write_text(
        f"# Comparison on `{r0.task}`\n\n" + (f"**Partial results: {len(results)} of {planned} runs finished.**\n\n"
                                                if partial else "") + f"{markdown_table(results)}\n"
        f"Seeds: {sorted({r.seed for r in results})}; accuracies are the mean (± std over seeds). "
        "`% of backbone` = trainable / parameters of the frozen encoder (the head counts as trainable). "
        f"Peak memory: {r0.memory_measure}; the last column is the formula 4·(N + 3·N_trainable) bytes.\n\n"
        f"Command: `{command}`\n\nBudget: {budget}\n\nDevice: {r0.device}; versions: {versions}\n")
    plot(results, paths["png"])
    return paths


def load_results(path) -> list[Result]:
    return [Result.from_dict(d) for d in json.loads(Path(path).read_text())["results"]]


def main(argv=None) -> list[Result]:
    from .tasks import TASKS

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m minipeft compare",
                                description="train registered methods with one budget on one task")
    p.add_argument("--task", default="sentiment", choices=sorted(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fast", action="store_true", help="the CI budget (Budget.fast()); also MINIPEFT_FAST=1")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"default: all registered ({' '.join(METHODS)})")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:  # fail before any training
        p.error(f"unknown method(s) {unknown}; registered methods: {sorted(METHODS)}")
    budget = Budget.fast() if args.fast else Budget.from_env()
    command = "python -m minipeft compare" + ("" if not argv else " " + shlex.join(argv))
    planned = len(args.methods or METHODS) * len(args.seeds)
    results = run_comparison(args.methods, args.task, args.seeds, budget, quiet=args.quiet,
                             on_result=lambda rs: write_results(rs, args.out, command, planned))
    paths = write_results(results, args.out, command)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


# ---- registered methods (lesson order; method lessons add theirs here) ----------------------------------------

def _prepare_full(model: SequenceClassifier) -> None:
    """Full fine-tuning: every parameter trains."""
    model.requires_grad_(True)


def _prepare_head(model: SequenceClassifier) -> None:
    """Head only (a linear probe): the encoder is frozen, only the classification head trains."""
    model.encoder.requires_grad_(False)
    model.head.requires_grad_(True)


register(MethodSpec("full", lesson="00", lr=1e-4, prepare=_prepare_full,
                    description="full fine-tuning: all encoder parameters + head"))
register(MethodSpec("head", lesson="00", lr=3e-3, prepare=_prepare_head,
                    description="head only: frozen encoder, linear head on mean-pooled states"))


def _prepare_bottleneck(placement: str, m: int):
    """Bottleneck adapters h <- h + W_up f(W_down h + b_down) + b_up (Houlsby et al. 2019, §2.1): ``houlsby`` two per
    layer, ``pfeiffer`` one per layer at the FFN (Pfeiffer et al. 2021); only the adapters and the head train."""
    def prepare(model: SequenceClassifier) -> None:
        from .api import add_adapter, train_adapter
        from .methods.bottleneck import BottleneckConfig

        add_adapter(model, BottleneckConfig(placement=placement, bottleneck=m), placement)
        train_adapter(model, placement)
    return prepare


register(MethodSpec("houlsby", lesson="01", lr=3e-3, prepare=_prepare_bottleneck("houlsby", 32),
                    config={"placement": "houlsby", "bottleneck": 32},
                    description="Houlsby adapters m=32, two per layer (1.33% of MiniLM; Houlsby et al. 2019)"))
register(MethodSpec("pfeiffer", lesson="01", lr=3e-3, prepare=_prepare_bottleneck("pfeiffer", 64),
                    config={"placement": "pfeiffer", "bottleneck": 64},
                    description="Pfeiffer adapter m=64, one per layer at the FFN (1.32% of MiniLM; Pfeiffer et al. 2021)"))


def _prepare_lora(model: SequenceClassifier) -> None:
    """LoRA r=8, α=16 on W_q, W_v: h = W0 x + (α/r) B A x (Hu et al. 2021, Eq. 3), 0.33% of MiniLM; only A, B and
    the head train. After training, ``merge_and_unload`` folds it into the weights (no inference cost)."""
    from .api import add_adapter, train_adapter
    from .methods.lora import LoRAConfig

    add_adapter(model, LoRAConfig(r=8, alpha=16, targets=["q", "v"]), "lora")
    train_adapter(model, "lora")


register(MethodSpec("lora", lesson="02", lr=2e-3, prepare=_prepare_lora,
                    config={"r": 8, "alpha": 16, "targets": ["q", "v"]},
                    description="LoRA r=8, alpha=16 on W_q, W_v (0.33% of MiniLM; Hu et al. 2021), mergeable"))


def _prepare_compacter(name: str):
    """Compacter (Houlsby placement) / Compacter++ (FFN, Pfeiffer placement), k=24, n=4: adapters whose projections
    are W = Σ A_i ⊗ s_i t_iᵀ with A shared by all layers (Karimi Mahabadi et al. 2021); adapter + head train.
    lr 3e-3 as in the paper (and in results/ and lesson 03's full run); a short probe (640 examples, 1 epoch) gave
    validation 0.620 / 0.678 / 0.750 at 1e-3 / 3e-3 / 1e-2, so 1e-2 is worth a try on the full budget."""
    def prepare(model: SequenceClassifier) -> None:
        from .api import add_adapter, train_adapter
        from .methods.compacter import CompacterConfig, CompacterPPConfig

        add_adapter(model, {"compacter": CompacterConfig, "compacter_pp": CompacterPPConfig}[name](bottleneck=24, n=4),
                    name)
        train_adapter(model, name)
    return prepare


register(MethodSpec("compacter", lesson="03", lr=3e-3, prepare=_prepare_compacter("compacter"),
                    config={"bottleneck": 24, "n": 4, "rank": 1, "placement": "houlsby"},
                    description="Compacter k=24, n=4 (0.065% of MiniLM; Karimi Mahabadi et al. 2021)"))
register(MethodSpec("compacter_pp", lesson="03", lr=3e-3, prepare=_prepare_compacter("compacter_pp"),
                    config={"bottleneck": 24, "n": 4, "rank": 1, "placement": "pfeiffer"},
                    description="Compacter++ k=24, n=4, FFN only (0.033% of MiniLM; Karimi Mahabadi et al. 2021)"))


def _prepare_parallel(scale):
    """Parallel adapter on every FFN site, r=96 (with the head 1.98% of MiniLM, within 2%), h ← h + s·A(x)
    (He et al. 2022, §4.1); only the adapter and the head train."""
    def prepare(model: SequenceClassifier) -> None:
        from .api import add_adapter, train_adapter
        from .methods.parallel import ParallelAdapterConfig

        add_adapter(model.encoder, ParallelAdapterConfig(r=96, placement="ffn", scale=scale), "parallel")
        train_adapter(model, "parallel")
    return prepare


register(MethodSpec("parallel", lesson="04", lr=2e-3, prepare=_prepare_parallel(1.0),
                    config={"r": 96, "placement": "ffn", "scale": 1.0},
                    description="parallel adapter r=96 on the FFN, s=1 (He et al. 2022)"))
register(MethodSpec("scaled_parallel", lesson="04", lr=2e-3, prepare=_prepare_parallel(4.0),
                    config={"r": 96, "placement": "ffn", "scale": 4.0},
                    description="scaled parallel adapter r=96 on the FFN, s=4 (He et al. 2022, §4.1)"))


def _prepare_prefix(model: SequenceClassifier) -> None:
    """Prefix tuning, l=30, reparameterised P = MLP(P') with k=512 (Li & Liang 2021, §4.3); only the prefix and the
    head train. Inference needs only P: the stored count is the ejected 2·l·d·L (``eject_prefix`` drops the MLP
    without changing the outputs, within 1e-6)."""
    from .api import add_adapter, train_adapter
    from .methods.prefix import PrefixConfig

    add_adapter(model.encoder, PrefixConfig(length=30, hidden=512, reparameterize=True), "prefix")
    train_adapter(model, "prefix")


register(MethodSpec("prefix", lesson="05", lr=1e-3, prepare=_prepare_prefix,
                    config={"length": 30, "hidden": 512, "reparameterize": True},
                    description="prefix tuning l=30, reparameterised (k=512), ejected for inference (Li & Liang 2021)"))
