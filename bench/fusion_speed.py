"""AdapterFusion's training step (N frozen Pfeiffer sources + the fusion training) vs one Pfeiffer adapter training,
and the fused model's inference latency vs a single adapter's.

    cd bench && ../.venv/bin/python fusion_speed.py  [--sources 4 --bottleneck 64 --batch 32 --seq 64 --threads 2
                                                      --repeats 15]   (--quick: batch 8 x 32, 3 repeats)

Both models are MiniLM + a 2-class head in train mode, on the same batch of real snippets, timed interleaved. Prints
the wall-clock and CPU-time ratio fusion / single adapter for the training step, with its floor in multiply-adds
(``step_macs``), then the inference latency (eval mode, no gradients) at batch 1 and at the training batch.

The floor, in multiply-adds per token and layer (T keys, d = 384, f = 1536, m = 64, N = 4, B·T = 2048 tokens):
    frozen backbone, forward 4d² + 2Td + 2df, backward to the inputs 4d² + 4Td + 2df          3,686,400
    one adapter: forward 2md, backward to its input and its weights 4md                    +   147,456
    fusion: the N frozen sources forward and back to their input (4Nmd), q W_K and V forward
    (2d²) and back to their inputs and weights (4d²), W_Qᵀ W_K once per layer (3d³ / BT)       + 1,360,896
a ratio of 1.317 (before W_Qᵀ W_K was folded: q, q W_K and V, 9d², 1.410). AdamW updates L(3d² + 2d) = 2.66M
parameters instead of L(2md + d + m) = 0.30M. What the measured ratio adds to the floor is memory traffic: the N
source outputs stacked, their gradients, the adapters' ReLU and the optimizer.
"""
import copy
import statistics
import time

import torch
from common import bench_arguments, inference, interleaved_medians, pin_threads, real_batch, training_step

from minipeft import BottleneckConfig, Encoder, FusionConfig, add_adapter, freeze_adapters, train_adapter
from minipeft.lab.train import SequenceClassifier


def step_macs(cfg, T: int, m: int, sources: int = 0, tokens: int = 1) -> float:
    """Multiply-adds per token of a training step with the backbone frozen (see the module docstring): one trained
    bottleneck adapter of width m, or (``sources`` > 0) a fusion over that many frozen ones; ``tokens`` = B·T."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    backbone = (4 * d * d + 2 * T * d + 2 * d * f) + (4 * d * d + 4 * T * d + 2 * d * f)
    if not sources:
        return L * (backbone + 6 * m * d)
    return L * (backbone + 4 * sources * m * d + 6 * d * d + 3 * d ** 3 / tokens)


def main():
    ap = bench_arguments(repeats=15)
    ap.add_argument("--sources", type=int, default=4, help="N, the number of fused adapters")
    ap.add_argument("--bottleneck", type=int, default=64, help="m of every Pfeiffer adapter")
    ap.add_argument("--quick", action="store_true", help="batch 8 x 32 tokens, 3 repeats: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats = 8, 32, 3
    pin_threads(args.threads)
    batch = real_batch(args.batch, args.seq)
    encoder = Encoder.from_pretrained()
    pfeiffer = BottleneckConfig(placement="pfeiffer", bottleneck=args.bottleneck)

    torch.manual_seed(0)
    single = SequenceClassifier(copy.deepcopy(encoder), num_labels=2).train()
    add_adapter(single, pfeiffer, "a")
    train_adapter(single, "a")

    torch.manual_seed(0)
    fused = SequenceClassifier(copy.deepcopy(encoder), num_labels=2).train()
    names = [f"source{i}" for i in range(args.sources)]
    for name in names:
        add_adapter(fused, pfeiffer, name)
    freeze_adapters(fused, *names)
    add_adapter(fused, FusionConfig(adapters=names), "fusion")
    train_adapter(fused, "fusion")

    steps = {name: training_step(model, batch, [p for p in model.parameters() if p.requires_grad])
             for name, model in (("single pfeiffer", single), (f"fusion of {args.sources}", fused))}
    cpu = {name: [] for name in steps}

    def cpu_timed(name, fn):
        def run():
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)
        return run

    wall = interleaved_medians({n: cpu_timed(n, fn) for n, fn in steps.items()}, repeats=args.repeats,
                               warmup=1 if args.quick else 3)
    cpu = {name: statistics.median(ts[-args.repeats:]) for name, ts in cpu.items()}  # warm-up calls dropped
    trained = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in
               (("single pfeiffer", single), (f"fusion of {args.sources}", fused))}
    print(f"training step, MiniLM + head, batch {args.batch} x {args.seq} real tokens, {args.threads} threads, "
          f"median of {args.repeats} (interleaved); Pfeiffer m={args.bottleneck}")
    print(f"  {'':18s} {'trained':>10} {'wall ms':>9} {'CPU ms':>9}")
    for name in steps:
        print(f"  {name:18s} {trained[name]:>10,} {wall[name] * 1000:9.1f} {cpu[name] * 1000:9.1f}")
    single_name, fused_name = list(steps)
    cfg = encoder.cfg
    floor = step_macs(cfg, args.seq, args.bottleneck, args.sources, args.batch * args.seq) / step_macs(
        cfg, args.seq, args.bottleneck)
    print(f"ratio fusion (N={args.sources}) / single Pfeiffer adapter: "
          f"wall {wall[fused_name] / wall[single_name]:.3f}, CPU {cpu[fused_name] / cpu[single_name]:.3f}   "
          f"(target <= 1.45; multiply-adds {floor:.3f})")

    single.eval(), fused.eval()
    for size in (1, args.batch):
        part = {k: v[:size] for k, v in batch.items()}
        latency = interleaved_medians({single_name: inference(single, part), fused_name: inference(fused, part)},
                                      repeats=args.repeats * 2, warmup=1 if args.quick else 3)
        print(f"inference, batch {size} x {args.seq}: single {latency[single_name] * 1000:.1f} ms, fusion "
              f"{latency[fused_name] * 1000:.1f} ms -> ratio {latency[fused_name] / latency[single_name]:.3f}")


if __name__ == "__main__":
    main()
