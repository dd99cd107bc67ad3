"""AdapterFusion's two stages on real tasks (Pfeiffer et al. 2021, §3), and its controls on a small target task.

    python -m minipeft transfer --sizes 100 300 --seeds 0 1 2 --out results/fusion

Stage 1 (knowledge extraction): one Pfeiffer adapter per source task, trained with the lessons' budget and saved
under the task's name (``<out>/sources/<task>/``; kept and reused when there). Stage 2 (knowledge composition):
on a target task with n training examples, five arms, each seed and n the same examples and budget:

    head            the frozen backbone and a new head (a linear probe)
    adapter         a fresh Pfeiffer adapter (stage 1's recipe, no transfer)
    source_frozen   the best source adapter, frozen, and a new head
    source_tuned    the best source adapter trained further, and a new head
    fusion          every source adapter frozen, a fusion over them and a new head

Chosen on validation (seed 0, the largest n): the best source, and fusion's learning rate among FUSION_LRS.
The fusion arm is also ``python -m minipeft compare --methods fusion`` (``attach_fusion``, on any task but the sources').
The record ``<out>/transfer.json`` keeps every Result (test predictions included, for paired tests), the test
labels, the sources' own accuracies, the choice of the best source, the machine and the command.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..api import add_adapter, load_adapter, set_active, train_adapter
from ..core import RECIPES, Recipe, get_recipe, register_recipe
from ..methods.bottleneck import BottleneckConfig  # noqa: F401  (registers the Pfeiffer recipe)
from ..methods.fusion import FusionConfig, freeze_adapters
from .records import check_output_dir, read_json, write_json
from .train import Budget, Result, train

SOURCES = ("sentiment", "vader_tweets", "subjectivity", "question")  # two near the target, two far from it
TARGET = "vader_amazon"
SOURCE_RECIPE = "pfeiffer"
FUSION_LRS = (5e-5, 5e-4, 2e-3)  # the paper's 5e-5 (§4, 10 epochs of thousands of examples) and two for our ~70 steps
FUSION_LR = 2e-3     # chosen on validation by the committed study (results/fusion/transfer.json)
ARMS = ("head", "adapter", "source_frozen", "source_tuned", "fusion")
SOURCES_DIR = Path(__file__).resolve().parents[2] / "results" / "fusion" / "sources"  # committed with the course


def target_budget(n: int, fast: bool = False) -> Budget:
    """n training examples, epochs = ceil(1000 / n) (about 1,000 examples seen in all, ~63-70 steps) at batch 16;
    200 validation, the whole test split (400). ``fast``: CI's few batches on the same code paths."""
    if fast:
        return Budget(max_train=min(n, 32), max_eval=32, max_test=32, epochs=2, batch_size=16, max_length=32,
                      timing_warmup_steps=1)
    return Budget(max_train=n, max_eval=200, epochs=math.ceil(1000 / n), batch_size=16)


def train_sources(directory=SOURCES_DIR, tasks=SOURCES, budget: Budget | None = None, seed: int = 0,
                  quiet: bool = True) -> dict[str, dict]:
    """Stage 1: a Pfeiffer adapter per source task, saved to ``directory/<task>/`` (a task already saved there is
    read, not retrained). Returns {task: {"test_acc", "val_acc", ...}} of each source on its own task."""
    from .compare import trained_adapters

    return trained_adapters(directory, SOURCE_RECIPE, tasks, budget, seed, quiet)


def check_sources(directory, tasks=SOURCES) -> None:
    """Refuse, before stage 1 trains anything, a sources folder that cannot hold the adapters or whose saved
    scores cannot be read (``ValueError`` naming the file)."""
    for task in tasks:
        scores = Path(directory) / task / "scores.json"
        if scores.is_file():
            read_json(scores)
        else:  # stage 1 will train it and write there
            check_output_dir(scores.parent, (scores.name,))


def load_sources(model: nn.Module, directory=SOURCES_DIR, tasks=SOURCES) -> list[str]:
    """Attach the saved source adapters under their tasks' names, frozen and inactive; return the names."""
    missing = [t for t in tasks if not (Path(directory) / t).is_dir()]
    if missing:
        raise FileNotFoundError(f"no saved source adapter for {missing} in {directory}; stage 1 makes them: "
                                f"minipeft.lab.transfer.train_sources({str(directory)!r})")
    for task in tasks:
        load_adapter(model, Path(directory) / task, name=task)
    freeze_adapters(model, *tasks)
    set_active(model)
    return list(tasks)


def build_arm(arm: str, seed: int, best: str | None = None, directory=SOURCES_DIR, task: str = TARGET):
    """A fresh target model for ``arm`` (see the module docstring), seeded; returns (model, lr)."""
    from .compare import build_model
    from .kinds import check_runs

    if arm in ("head", "adapter"):
        spec = get_recipe("head" if arm == "head" else SOURCE_RECIPE)
        return build_model(spec, task, seed), spec.lr
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")
    check_runs(["fusion"], [task])  # every other arm reads the source adapters: not on the sources' own tasks
    model = build_model("head", task, seed)  # frozen backbone, new head
    if arm == "fusion":
        attach_fusion(model, directory)
        return model, FUSION_LR
    if best is None:
        raise ValueError(f"arm {arm!r} needs the best source's name (one of {SOURCES})")
    load_sources(model, directory, (best,))
    set_active(model, best)
    if arm == "source_tuned":
        train_adapter(model, best)
    return model, get_recipe(SOURCE_RECIPE).lr


def attach_fusion(model: nn.Module, directory=None) -> None:
    """Every source adapter, frozen, and a fusion over them that trains with the head. ``directory``: where the saved
    sources are; None (``python -m minipeft compare``'s fusion recipe: both stages in order): the committed
    SOURCES_DIR, else stage 1 first, into runs/fusion/sources. On the meta device (the parameter explorer) fresh
    adapters of the sources' shape stand in for them."""
    if any(p.is_meta for p in model.parameters()):
        for task in SOURCES:
            add_adapter(model, RECIPES[SOURCE_RECIPE].make(RECIPES[SOURCE_RECIPE].knob.default), task)
        freeze_adapters(model, *SOURCES)
        set_active(model)
    else:
        if directory is None:
            directory = SOURCES_DIR
            if not all((SOURCES_DIR / t / "scores.json").exists() for t in SOURCES):
                directory = Path("runs/fusion/sources")
                train_sources(directory, budget=Budget.from_env())  # stage 1 where its adapters are missing
        load_sources(model, directory)
    add_adapter(model, FusionConfig(adapters=list(SOURCES)), "fusion")
    train_adapter(model, "fusion")


register_recipe(Recipe("fusion", lesson="07", lr=FUSION_LR, prepare=attach_fusion, ablation=True,
                       config={"sources": list(SOURCES), "source_recipe": SOURCE_RECIPE},
                       description=f"AdapterFusion over Pfeiffer adapters trained on {', '.join(SOURCES)}",
                       not_for_tasks=SOURCES))


def run_arm(arm: str, n: int, seed: int, best: str | None = None, directory=SOURCES_DIR, fast: bool = False,
            quiet: bool = True, lr: float | None = None) -> Result:
    model, arm_lr = build_arm(arm, seed, best, directory)
    return train(model, TARGET, lr or arm_lr, target_budget(n, fast), seed=seed, method=arm,
                 config={"n": n, "source": best, "sources": list(SOURCES)}, quiet=quiet)


def fusion_against_controls(record: dict) -> dict[int, dict]:
    """Per target size n of a ``transfer.json`` record: each arm's runs and mean ± 95% half-width over seeds, the
    best control (highest mean of the other arms) and fusion paired against every control (seed s with seed s, on
    the same test examples: ``report.paired_against``)."""
    from .report import paired_against
    from .stats import mean_interval

    runs: dict[int, dict[str, list[Result]]] = {}
    for d in record["results"]:
        runs.setdefault(d["config"]["n"], {}).setdefault(d["method"], []).append(Result.from_dict(d))
    out = {}
    for n, arms in sorted(runs.items()):
        means = {arm: mean_interval([r.test_acc for r in rs]) for arm, rs in arms.items()}
        controls = [a for a in arms if a != "fusion"]
        out[n] = {"runs": arms, "means": means, "best_control": max(controls, key=lambda a: means[a][0]),
                  "vs": {a: paired_against(arms["fusion"], arms[a], record["test_labels"]) for a in controls}}
    return out


def main(argv=None) -> dict:
    from .compare import Once, machine, test_labels
    from .tasks import load_task
    from .train import is_fast

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m minipeft transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 300], action=Once, help="target training examples")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], action=Once)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, action=Once)
    p.add_argument("--fast", action="store_true", help="CI's few batches (also MINIPEFT_FAST=1)")
    p.add_argument("--out", default="runs/fusion", action=Once,
                   help="folder of the record (and of sources/ unless --sources)")
    p.add_argument("--sources", default=None, action=Once,
                   help="folder of the saved source adapters (default <out>/sources)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.sizes):
        p.error(f"--sizes must be positive numbers of examples, got {args.sizes}")
    available = load_task(TARGET, max_eval=1, max_test=1)["train"].num_rows
    if max(args.sizes) > available:  # a larger n would train on the whole split and be recorded as n
        p.error(f"--sizes: {TARGET} has {available} training examples, got {args.sizes}")
    fast, out, n_max = args.fast or is_fast(), Path(args.out), max(args.sizes)
    directory = Path(args.sources) if args.sources else out / "sources"
    try:  # before stage 1 trains anything: a refused command leaves the files as they were
        check_output_dir(out, ("transfer.json",))
        check_sources(directory)
    except ValueError as e:
        sys.exit(f"error: {e}")
    started, done = machine(), {}  # (arm, n, seed, best or lr) -> Result: a choosing run is reused, not rerun

    def run(arm, n, seed, best=None, lr=None):
        key = (arm, n, seed, best if arm.startswith("source") else lr)
        if key not in done:
            done[key] = run_arm(arm, n, seed, best, directory, fast, args.quiet, lr)
        return done[key]

    sources = train_sources(directory, budget=Budget.fast() if fast else Budget.lesson(), quiet=args.quiet)
    # choices on validation, seed 0, the largest n: the best source (frozen, new head), then fusion's learning rate
    best_val = {s: run("source_frozen", n_max, 0, s).val_acc[-1] for s in SOURCES}
    best = max(best_val, key=best_val.get)
    lr_val = {lr: run("fusion", n_max, 0, lr=lr).val_acc[-1] for lr in FUSION_LRS}
    fusion_lr = max(lr_val, key=lr_val.get)
    print(f"best source: {best} {best_val}; fusion lr: {fusion_lr} {lr_val}", flush=True)
    record = {"command": "python -m minipeft transfer " + shlex.join(argv), "target": TARGET, "sources": sources,
              "best_source": best, "best_source_val": best_val, "fusion_lr": fusion_lr,
              "fusion_lr_val": {str(k): v for k, v in lr_val.items()},
              "budgets": {str(n): asdict(target_budget(n, fast)) for n in args.sizes},
              "test_labels": test_labels(TARGET, target_budget(n_max, fast)), "results": []}
    for n in args.sizes:
        for seed in args.seeds:
            for arm in args.arms:
                r = run(arm, n, seed, best, fusion_lr if arm == "fusion" else None)
                record["results"].append(r.to_dict())
                print(f"n={n} seed {seed} {arm}: test acc {r.test_acc:.3f}, {r.sec_per_step:.2f} s/step", flush=True)
                now = machine()
                record["machine"] = {**now, "load_average": {"start": started["load_average"],
                                                             "end": now["load_average"]}}
                out.mkdir(parents=True, exist_ok=True)
                write_json(out / "transfer.json", record)  # after every run: an interrupt keeps what finished
    return record

