"""A training step with bottleneck adapters vs the frozen-backbone floor (and full fine-tuning, for context).

    cd bench && ../.venv/bin/python adapter_step.py  [--batch 32 --seq 64 --threads 2 --repeats 20]

Every model is MiniLM + a 2-class SequenceClassifier head, in train mode, on the same batch of real snippets
(padded/truncated to exactly --seq tokens). The floor (``common.freeze_to_floor``) freezes every encoder
weight but keeps gradients flowing through all layers: any method that inserts into every layer pays at least
that. Target: Houlsby / floor and Pfeiffer / floor <= 1.15 (issue 4).

Two clocks: wall time (``interleaved_medians``) and this process's CPU time (``time.process_time``, all threads)
recorded around the same calls. On a machine shared with other jobs the wall time measures the queue as much as
the work; the CPU time is the steadier of the two there.
"""
import copy
import statistics
import time

import torch
from common import bench_arguments, freeze_to_floor, interleaved_medians, pin_threads, real_batch, training_step

from minipeft import BottleneckConfig, Encoder, add_adapter, train_adapter
from minipeft.lab.train import SequenceClassifier

ADAPTERS = {"houlsby m=32": BottleneckConfig(placement="houlsby", bottleneck=32),
            "pfeiffer m=64": BottleneckConfig(placement="pfeiffer", bottleneck=64)}


def main():
    ap = bench_arguments()
    args = ap.parse_args()
    pin_threads(args.threads)
    batch = real_batch(args.batch, args.seq)
    encoder = Encoder.from_pretrained()

    def classifier():
        torch.manual_seed(0)
        return SequenceClassifier(copy.deepcopy(encoder), num_labels=2).train()

    steps = {}
    floor = classifier()
    steps["floor (frozen, grads flow)"] = training_step(floor, batch, freeze_to_floor(floor))
    for name, cfg in ADAPTERS.items():
        model = classifier()
        add_adapter(model, cfg, "a")
        train_adapter(model, "a")
        steps[name] = training_step(model, batch, [p for p in model.parameters() if p.requires_grad])
    full = classifier()
    steps["full fine-tuning"] = training_step(full, batch, list(full.parameters()))

    cpu = {name: [] for name in steps}

    def cpu_timed(name, fn):
        def run():
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)
        return run

    wall = interleaved_medians({name: cpu_timed(name, fn) for name, fn in steps.items()}, repeats=args.repeats)
    cpu = {name: statistics.median(ts[-args.repeats:]) for name, ts in cpu.items()}  # warm-up calls dropped
    floor = "floor (frozen, grads flow)"
    print(f"training step, MiniLM + head, batch {args.batch} x {args.seq} real tokens, {args.threads} threads, "
          f"median of {args.repeats} (interleaved)")
    print(f"  {'':28s} {'wall ms':>9} {'ratio':>6}   {'CPU ms':>9} {'ratio':>6}")
    for name in steps:
        print(f"  {name:28s} {wall[name] * 1000:9.1f} {wall[name] / wall[floor]:6.3f}   "
              f"{cpu[name] * 1000:9.1f} {cpu[name] / cpu[floor]:6.3f}")
    for name in ADAPTERS:
        r_wall, r_cpu = wall[name] / wall[floor], cpu[name] / cpu[floor]
        print(f"ratio {name} / floor: wall {r_wall:.3f}, CPU {r_cpu:.3f}  (target <= 1.15: "
              f"{'met' if max(r_wall, r_cpu) <= 1.15 else 'NOT met'})")


if __name__ == "__main__":
    main()
