"""Compacter's cost: (1) ways to compute a PHM layer, (2) one PHM layer vs a dense layer, (3) a training step
with Compacter vs the frozen-backbone floor. All ratios measured side by side (interleaved medians), on two
clocks: wall time, and this process's CPU time (``time.process_time``), which is far less disturbed when
other jobs share the machine (use --threads 1 for the cleanest CPU-time numbers).

    cd bench && ../.venv/bin/python compacter_speed.py  [--batch 32 --seq 64 --threads 2 --repeats 20]
Targets: Compacter training step / floor <= 1.2 (issue 8); the PHM layer vs dense is printed, no target.
"""
import statistics
import time

import torch
import torch.nn.functional as F
from common import bench_arguments, freeze_to_floor, pin_threads, real_batch, training_step
from torch import nn

from minipeft import add_adapter, train_adapter
from minipeft.backbones.encoder import Encoder
from minipeft.methods.bottleneck import BottleneckConfig
from minipeft.methods.compacter import CompacterConfig, CompacterPPConfig
from minipeft.methods.phm import PHMLinear, kron_sum, kron_sum_reference, phm_apply_factored
from minipeft.lab.train import SequenceClassifier


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """name -> (median wall seconds, median CPU seconds), timed round-robin like common.interleaved_medians."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


def ratio(t: dict, name: str, base: str) -> str:
    return f"{t[name][0] / t[base][0]:.2f} wall / {t[name][1] / t[base][1]:.2f} cpu"


def fwd_bwd(fn, params, x):
    def run():
        fn(x).pow(2).mean().backward()
        for p in params:
            p.grad = None
    return run


def layer_options(d_in, d_out, n, rank, tokens, repeats):
    """(a) W = Σ A_i ⊗ B_i built once by one einsum, then one matmul (what PHMLinear does); (b) the factored
    einsum on x (no W); (c) W built by an explicit torch.kron loop, then a matmul; vs a dense nn.Linear."""
    torch.manual_seed(0)
    phm, dense = PHMLinear(d_in, d_out, n, rank), nn.Linear(d_in, d_out)
    x = torch.randn(tokens, d_in)
    full = rank is None
    ops = {
        "dense": (dense, list(dense.parameters())),
        "(a) build W, matmul": (phm, list(phm.parameters())),
        "(b) factored einsum": (lambda x: phm_apply_factored(x, phm.A, phm.B) + phm.bias if full else
                                phm_apply_factored(x, phm.A, phm.s, phm.t) + phm.bias, list(phm.parameters())),
        "(c) torch.kron loop": (lambda x: F.linear(x, kron_sum_reference(phm.A, phm.B_matrices()).mT, phm.bias),
                                list(phm.parameters())),
    }
    ref = x @ kron_sum(phm.A, phm.B_matrices()) + phm.bias
    for name, (fn, _) in ops.items():  # every option computes the same map
        assert name == "dense" or torch.allclose(fn(x), ref, atol=1e-4), name
    return interleaved({k: fwd_bwd(fn, ps, x) for k, (fn, ps) in ops.items()}, repeats=repeats)


def main():
    ap = bench_arguments()
    ap.add_argument("--k", type=int, default=24, help="bottleneck")
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    pin_threads(args.threads)
    tokens, d = args.batch * args.seq, 384
    print(f"MiniLM d={d}, bottleneck k={args.k}, n={args.n}; {tokens} tokens ({args.batch} x {args.seq}), "
          f"{args.threads} threads, median of {args.repeats}; forward+backward")

    print("\n1-2. one PHM layer, implementation options, time / dense nn.Linear of the same shape")
    for d_in, d_out in ((d, args.k), (args.k, d)):
        for rank in (1, None):
            t = layer_options(d_in, d_out, args.n, rank, tokens, args.repeats)
            kind = "LPHM r=1" if rank else "PHM full B"
            print(f"  {d_in:>4} -> {d_out:<4} {kind:11s} (dense {t['dense'][1] * 1e3:.1f} ms cpu)")
            for k in t:
                if k != "dense":
                    print(f"      {k:22s} {ratio(t, k, 'dense')}")

    print("\n3. training step (forward + backward + AdamW) on MiniLM, time / frozen-backbone floor")
    batch = real_batch(args.batch, args.seq)
    base = Encoder.from_pretrained().train()
    steps = {}
    torch.manual_seed(0)
    floor = SequenceClassifier(base, 2)
    steps["floor"] = training_step(floor, batch, freeze_to_floor(floor))
    for name, config in (("compacter", CompacterConfig(bottleneck=args.k, n=args.n)),
                         ("compacter_pp", CompacterPPConfig(bottleneck=args.k, n=args.n)),
                         ("houlsby", BottleneckConfig(bottleneck=args.k))):
        torch.manual_seed(0)
        model = SequenceClassifier(Encoder.from_pretrained().train(), 2)
        add_adapter(model, config, name)
        train_adapter(model, name)
        steps[name] = training_step(model, batch, [p for p in model.parameters() if p.requires_grad])
    t = interleaved(steps, repeats=max(3, args.repeats // 2))
    for name in t:
        print(f"  {name:13s} {ratio(t, name, 'floor')}  x floor")
    print(f"compacter step / floor = {ratio(t, 'compacter', 'floor')} (target <= 1.2)")


if __name__ == "__main__":
    main()
