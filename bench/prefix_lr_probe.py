"""How lesson 05's learning rates (reparameterised and flat prefix, l = 30) were chosen, on validation.

    .venv/bin/python bench/prefix_lr_probe.py --reparameterised 3e-4,1e-3,3e-3 --flat 3e-3,1e-2,3e-2

For each variant and learning rate: lesson 05's prefix (l = 30; the reparameterised one with an MLP of width 512)
on MiniLM with a head (seed 0), trained on ``sentiment`` with the lesson's budget (``Budget.lesson()``) cut to
``--max-train`` examples, then the accuracy on the validation split (500 examples; the test split is not read).
The highest last-epoch validation accuracy wins. A probe, not a sweep: one seed, a smaller training set, as
``classification_lr_probe.py`` does for the recipes of lesson 10.
"""
import argparse

from classification_lr_probe import probe, rates

from minipeft import Encoder, add_adapter, train_adapter
from minipeft.lab.train import SequenceClassifier, seed_everything
from minipeft.methods.prefix import PrefixConfig

LENGTH, HIDDEN = 30, 512  # lesson 05's prefix


def prefix_classifier(reparameterize: bool, seed: int = 0) -> SequenceClassifier:
    seed_everything(seed)
    model = SequenceClassifier(Encoder.from_pretrained(), num_labels=2)
    add_adapter(model.encoder, PrefixConfig(length=LENGTH, hidden=HIDDEN, reparameterize=reparameterize), "prefix")
    train_adapter(model, "prefix")  # only the prefix and the head train
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reparameterised", default="3e-4,1e-3,3e-3", help="learning rates, comma-separated ('' skips)")
    p.add_argument("--flat", default="3e-3,1e-2,3e-2", help="learning rates, comma-separated ('' skips)")
    p.add_argument("--max-train", type=int, default=1000)
    args = p.parse_args()
    probe("sentiment", [(variant, lr, lambda re=variant == "reparameterised": (prefix_classifier(re), {}))
                        for variant in ("reparameterised", "flat") for lr in rates(getattr(args, variant))],
          args.max_train)


if __name__ == "__main__":
    main()
