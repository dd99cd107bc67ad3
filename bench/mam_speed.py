"""MAM adapter speed (MiniLM): its training step against the sum of its parts' overheads; ejected inference vs base.

    cd bench && ../.venv/bin/python mam_speed.py  [--batch 32 --seq 64 --budget 0.02 --threads 2 --repeats 15]
Targets: MAM step − floor <= (prefix step − floor) + (scaled PA step − floor)   (no composition tax, ratio <= 1.0);
         ejected MAM inference / base inference <= 1.15 (batch 32 x 64).
All three adapters are the very parts of one MAM (same l, same r), each attached alone to a copy of the model.
"""
import copy

import torch
from common import (bench_arguments, freeze_to_floor, inference, interleaved_medians, pin_threads, real_batch,
                    training_step)

from minipeft import add_adapter, eject_prefix, train_adapter
from minipeft.backbones.encoder import Encoder
from minipeft.methods.mam import MAMConfig
from minipeft.lab.train import SequenceClassifier


def main():
    ap = bench_arguments(repeats=15)
    ap.add_argument("--budget", type=float, default=0.02, help="MAM's stored budget (fraction of the backbone)")
    args = ap.parse_args()
    pin_threads(args.threads)
    batch = real_batch(args.batch, args.seq)
    torch.manual_seed(0)
    base = SequenceClassifier(Encoder.from_pretrained(), 2).train()
    mam_config = MAMConfig(reduction_factor=None, budget=args.budget)
    parts = mam_config.parts(base.encoder)

    floor = copy.deepcopy(base)
    timed = {"floor step": training_step(floor, batch, freeze_to_floor(floor))}
    models = {}
    for name, config in (("mam", mam_config), ("prefix part", parts["prefix"]), ("FFN part", parts["ffn"])):
        models[name] = m = copy.deepcopy(base)
        add_adapter(m, config, "a")
        train_adapter(m, "a")
        timed[f"{name} step"] = training_step(m, batch, [p for p in m.parameters() if p.requires_grad])

    ejected = copy.deepcopy(models["mam"]).eval()
    eject_prefix(ejected, "a")
    infer_base = copy.deepcopy(base).eval()

    timed.update({"base inference": inference(infer_base, batch), "ejected MAM inference": inference(ejected, batch)})
    t = interleaved_medians(timed, repeats=args.repeats)
    print(f"batch {args.batch} x {args.seq} tokens, MAM budget {args.budget:g} (prefix l={parts['prefix'].length}, "
          f"PA r={parts['ffn'].r}, s={parts['ffn'].scale:g}), {args.threads} threads, median of {args.repeats}")
    for name, sec in t.items():
        print(f"  {name:24s} {sec * 1000:8.1f} ms")
    over = {n: t[f"{n} step"] - t["floor step"] for n in ("mam", "prefix part", "FFN part")}
    print(f"MAM overhead / (prefix overhead + FFN overhead): {over['mam'] / (over['prefix part'] + over['FFN part']):.3f}"
          f"   (overheads over the floor, ms: {over['mam'] * 1e3:.1f} vs {over['prefix part'] * 1e3:.1f} + "
          f"{over['FFN part'] * 1e3:.1f}; target <= 1.0)")
    print(f"ejected MAM inference / base: {t['ejected MAM inference'] / t['base inference']:.3f}   (target <= 1.15)")


if __name__ == "__main__":
    main()
