"""Prefix tuning speed (MiniLM, l=30): training step vs the frozen-backbone floor; ejected inference vs base.

    cd bench && ../.venv/bin/python prefix_speed.py  [--batch 32 --seq 64 --length 30 --threads 2 --repeats 15]
Targets: reparameterised-prefix training step / frozen-backbone floor <= 1.3;
         ejected-prefix inference / base inference <= 1.1 (batch 32 x 64).
The floor (``freeze_to_floor``) already pays the backward pass through every layer; a prefix adds l keys and
values per layer (T + l instead of T) and, while reparameterised, one MLP call per step.
"""
import argparse
import copy

import torch
from common import freeze_to_floor, inference, interleaved_medians, pin_threads, real_batch, training_step

from minipeft import add_adapter, train_adapter
from minipeft.backbones.encoder import Encoder
from minipeft.methods.prefix import PrefixConfig, eject_prefix
from minipeft.lab.train import SequenceClassifier


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--length", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    pin_threads(args.threads)
    batch = real_batch(args.batch, args.seq)
    torch.manual_seed(0)
    base = SequenceClassifier(Encoder.from_pretrained(), 2).train()

    floor = copy.deepcopy(base)
    floor_params = freeze_to_floor(floor)
    models = {}
    for name, reparam in (("reparameterised", True), ("flat", False)):
        m = copy.deepcopy(base)
        add_adapter(m.encoder, PrefixConfig(length=args.length, reparameterize=reparam), "p")
        train_adapter(m, "p")
        models[name] = m
    timed = {"floor step": training_step(floor, batch, floor_params)}
    timed.update({f"{n} step": training_step(m, batch, [p for p in m.parameters() if p.requires_grad])
                  for n, m in models.items()})

    # inference (eval mode, no grad): base vs the ejected reparameterised prefix
    ejected = copy.deepcopy(models["reparameterised"]).eval()
    eject_prefix(ejected.encoder, "p")
    infer_base = copy.deepcopy(base).eval()

    timed.update({"base inference": inference(infer_base, batch), "ejected inference": inference(ejected, batch)})
    t = interleaved_medians(timed, repeats=args.repeats)
    print(f"batch {args.batch} x {args.seq} tokens, prefix l={args.length}, {args.threads} threads, "
          f"median of {args.repeats}")
    for name, sec in t.items():
        print(f"  {name:22s} {sec * 1000:8.1f} ms")
    print(f"training step / floor: reparameterised {t['reparameterised step'] / t['floor step']:.3f}, "
          f"flat {t['flat step'] / t['floor step']:.3f}   (target <= 1.3)")
    print(f"ejected inference / base: {t['ejected inference'] / t['base inference']:.3f}   (target <= 1.1)")


if __name__ == "__main__":
    main()
