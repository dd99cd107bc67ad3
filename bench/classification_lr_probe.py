"""How the learning rates of lesson 10's recipes (ia3, dora, bitfit, prompt_tuning) were chosen, on validation.

    .venv/bin/python bench/classification_lr_probe.py question bitfit=1e-3,3e-3,1e-2 prompt_tuning=3e-3,3e-2,3e-1

For each method and learning rate: the course's recipe on MiniLM (seed 0), trained on ``task`` with the lesson's
budget (``Budget.lesson()``: 2 epochs of 2,000 examples, warm-up and decay) cut to ``--max-train`` examples, then
the accuracy on the validation split (the 500 examples ``train`` evaluates after each epoch; the test split is not
read). The highest last-epoch validation accuracy wins. A probe, not a sweep: one seed, a smaller training set,
so that choosing costs less than the comparison it feeds.
"""
import argparse
import dataclasses

from common import pin_threads

from minipeft.core import get_recipe
from minipeft.lab.kinds.classification import build_classifier
from minipeft.lab.train import Budget, train


def probe(task: str, runs, max_train: int = 1000) -> None:
    """Train each of ``runs`` — (name, lr, make: () -> (model, config)) — on ``task`` with the lesson's budget cut
    to ``max_train`` examples (the test split is not read), and print its validation accuracy per epoch (the last
    epoch's is the choice) and its last training losses."""
    pin_threads(2)
    budget = dataclasses.replace(Budget.lesson(), max_train=max_train, max_test=1)
    print(f"task {task}, seed 0, budget {budget}", flush=True)
    for name, lr, make in runs:
        model, config = make()
        r = train(model, task, lr, budget, seed=0, method=name, config=config, quiet=True)
        print(f"{name} lr {lr:g}: validation acc {r.val_acc[-1]:.3f} (per epoch {r.val_acc}); "
              f"last training losses {[round(x, 2) for x in r.losses[-4:]]}", flush=True)


def rates(text: str) -> list[float]:
    """"1e-3,3e-3" -> [0.001, 0.003]; an empty string -> []."""
    return [float(x) for x in text.split(",") if x]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task")
    p.add_argument("rates", nargs="+", help="method=lr1,lr2,...")
    p.add_argument("--max-train", type=int, default=1000)
    args = p.parse_args()
    specs = {method: (get_recipe(method), rates(lrs)) for method, lrs in (a.split("=") for a in args.rates)}
    probe(args.task, [(method, lr, lambda spec=spec: (build_classifier(spec, args.task, seed=0), spec.config))
                      for method, (spec, lrs) in specs.items() for lr in lrs], args.max_train)


if __name__ == "__main__":
    main()
