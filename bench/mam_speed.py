"""MAM adapter speed (MiniLM): its training step against the sum of its parts' overheads; ejected inference vs base.

    cd bench && ../.venv/bin/python mam_speed.py  [--batch 32 --seq 64 --budget 0.02 --threads 2 --repeats 15]
Targets: MAM step − floor <= (prefix step − floor) + (scaled PA step − floor)   (no composition tax, ratio <= 1.0);
         ejected MAM inference / base inference <= 1.15 (batch 32 x 64).
All three adapters are the very parts of one MAM (same l, same r), each attached alone to a copy of the model.
The two inference models are timed in their own interleaved round (not between training steps, whose memory
traffic would slow whichever runs next).

The floor of the inference ratio, counted in multiply-adds per token and layer (``inference_macs``; every position of
the padded batch counts, as the kernels compute them all): the base model does 4d² (q, k, v, o) + 2Td (QKᵀ and AV
over T keys) + 2df (the FFN); the ejected MAM attends over l + T keys and adds its parallel adapter's 2rd. MiniLM
(d = 384, f = 1536), T = 64, l = 30, r = 67: 1,818,624 vs 1,893,120, a ratio of 1.041. The prefix's keys are 47%
more keys, but attention over 64 keys is only 2.7% of the base's multiply-adds. In time it is 10% (the fused
attention kernel runs its small per-head products and softmax far below the big matmuls' rate), so the ratio's floor
with these kernels is higher: per forward of 185 ms (2 threads, torch.profiler) the ejected MAM adds attention over
94 keys +7.7 ms, the adapter's two matmuls (r = 67) +6.9 ms, the keys and values copied behind the prefix +3.9 ms and
+4 ms of small ops (ReLU, the residual add, bias copies): 1.13-1.14. Fresh pages for the large temporaries move either
model by 5-15% from process to process (glibc hands freed memory back to the kernel); with
MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_MMAP_THRESHOLD_=33554432 in the environment they stay mapped.
"""
import copy

import torch
from common import (bench_arguments, freeze_to_floor, inference, interleaved_medians, pin_threads, real_batch,
                    training_step)

from minipeft import add_adapter, eject_prefix, train_adapter
from minipeft.backbones.encoder import Encoder
from minipeft.methods.mam import MAMConfig
from minipeft.lab.train import SequenceClassifier


def inference_macs(cfg, T: int, l: int = 0, r: int = 0) -> int:
    """Multiply-adds per token of a forward pass through the L blocks (see the module docstring): L(4d² + 2(T + l)d
    + 2df + 2rd); l prefix positions, a parallel adapter of bottleneck r."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers * (4 * d * d + 2 * (T + l) * d + 2 * d * f + 2 * r * d)


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

    t = interleaved_medians(timed, repeats=args.repeats)
    t.update(interleaved_medians({"base inference": inference(infer_base, batch),
                                  "ejected MAM inference": inference(ejected, batch)}, repeats=2 * args.repeats))
    print(f"batch {args.batch} x {args.seq} tokens, MAM budget {args.budget:g} (prefix l={parts['prefix'].length}, "
          f"PA r={parts['ffn'].r}, s={parts['ffn'].scale:g}), {args.threads} threads, median of {args.repeats}")
    for name, sec in t.items():
        print(f"  {name:24s} {sec * 1000:8.1f} ms")
    over = {n: t[f"{n} step"] - t["floor step"] for n in ("mam", "prefix part", "FFN part")}
    print(f"MAM overhead / (prefix overhead + FFN overhead): {over['mam'] / (over['prefix part'] + over['FFN part']):.3f}"
          f"   (overheads over the floor, ms: {over['mam'] * 1e3:.1f} vs {over['prefix part'] * 1e3:.1f} + "
          f"{over['FFN part'] * 1e3:.1f}; target <= 1.0)")
    macs = {"base": inference_macs(base.encoder.cfg, args.seq),
            "mam": inference_macs(base.encoder.cfg, args.seq, parts["prefix"].length, parts["ffn"].r)}
    print(f"ejected MAM inference / base: {t['ejected MAM inference'] / t['base inference']:.3f}   (target <= 1.15; "
          f"multiply-adds per token {macs['mam']:,} / {macs['base']:,} = {macs['mam'] / macs['base']:.3f})")


if __name__ == "__main__":
    main()
