"""Serving four task adapters on one MiniLM: one mixed batch (``adapter_names=``, each example its own adapter) vs
the ways to serve them without routing, inference latency measured side by side (interleaved medians).

    cd bench && ../.venv/bin/python serving.py  [--batch 32 --seq 64 --threads 2 --repeats 20]  (--quick: 8 x 32)
                                                [--out ../results/serving/costs.json]  (lesson 12 reads it)

For each method (LoRA r=8 on q, v; Pfeiffer's bottleneck m=64; the parallel adapter r=96; prefix l=30), four
adapters t0..t3 with random weights (the cost does not depend on their values) and B real snippets, B/4 per task:

    single     all B examples with one adapter (the active set): what routing should cost about as much as
    mixed      the same B examples, example i with adapter t_(i mod 4), in one batch (``per_example``)
    per task   four batches of B/4, one per adapter (set_active between them)
    merge      LoRA only: four batches of B/4, merging each adapter into W before and unmerging it after

and the memory of serving four tasks: one backbone + four adapters vs four merged copies of the model.
Per adapter, routing gathers its examples' rows at each site, computes its Δh on them and adds it back in place
(``index_add``): an adapter's work is done once per example, as in the single batch; what routing adds is the
gathers and scatters, and for the prefix, keys padded to the longest prefix with a per-row mask.
"""
import json
import platform

import torch
from common import bench_arguments, interleaved_medians, pin_threads, real_batch

from minipeft import (BottleneckConfig, Encoder, LoRAConfig, ParallelAdapterConfig, PrefixConfig, add_adapter,
                      merge_adapter, set_active, unmerge_adapter)

TASKS = [f"t{i}" for i in range(4)]
METHODS = {"lora": lambda: LoRAConfig(r=8, alpha=16),
           "pfeiffer": lambda: BottleneckConfig(placement="pfeiffer", bottleneck=64),
           "parallel": lambda: ParallelAdapterConfig(r=96),
           "prefix": lambda: PrefixConfig(length=30, reparameterize=False)}


def four_adapters(make) -> Encoder:
    model = Encoder.from_pretrained().eval()
    torch.manual_seed(0)
    for name in TASKS:
        add_adapter(model, make(), name)
    with torch.no_grad():  # off their identity init: B = 0 or near-identity adapters would skip no work anyway
        for n, p in model.named_parameters():
            if any(f".{t}." in n or n.startswith(f"prefixes.{t}.") for t in TASKS):
                p.add_(0.02 * torch.randn_like(p))
    return model


def timings(method: str, batch: dict, repeats: int) -> dict[str, float]:
    model = four_adapters(METHODS[method])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    names = [TASKS[i % 4] for i in range(len(ids))]
    groups = {t: [i for i, n in enumerate(names) if n == t] for t in TASKS}

    def single():
        set_active(model, "t0")
        model(ids, mask)

    def mixed():
        model(ids, mask, adapter_names=names)

    def per_task():
        for t, rows in groups.items():
            set_active(model, t)
            model(ids[rows], mask[rows])

    def merge_each():
        for t, rows in groups.items():
            set_active(model, t)
            merge_adapter(model, t)
            model(ids[rows], mask[rows])
            unmerge_adapter(model, t)

    fns = {"single": single, "mixed": mixed, "per task": per_task}
    if method == "lora":
        fns["merge"] = merge_each
    with torch.no_grad():
        return interleaved_medians(fns, repeats=repeats)


def memory_mib() -> tuple[float, float]:
    """(one MiniLM + four LoRA r=8 adapters, four merged MiniLM copies), in MiB of fp32 parameters."""
    model = four_adapters(METHODS["lora"])
    total = sum(p.numel() for p in model.parameters())
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".output_deltas." in n)
    base = total - adapters
    return 4 * total / 2 ** 20, 4 * 4 * base / 2 ** 20


def main():
    ap = bench_arguments()
    ap.add_argument("--quick", action="store_true", help="batch 8 x 32 tokens, 3 repeats")
    ap.add_argument("--out", default=None, help="also write the table to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats = 8, 32, 3
    pin_threads(args.threads)
    batch = real_batch(args.batch, args.seq)
    print(f"MiniLM, batch {args.batch} x {args.seq} tokens (B/4 per task), {args.threads} threads, median of "
          f"{args.repeats} interleaved rounds; ratios to 'single' (one adapter for the whole batch)")
    print(f"{'method':<10}{'single ms':>10}{'mixed':>8}{'per task':>10}{'merge':>8}")
    table = {}
    for method in METHODS:
        t = timings(method, batch, args.repeats)
        table[method] = {"single_ms": 1e3 * t["single"], **{k: t[k] / t["single"] for k in t if k != "single"}}
        merge = f"{table[method]['merge']:>8.2f}" if "merge" in t else f"{'-':>8}"
        print(f"{method:<10}{1e3 * t['single']:>10.1f}{table[method]['mixed']:>8.2f}"
              f"{table[method]['per task']:>10.2f}{merge}")
    shared, copies = memory_mib()
    print(f"memory for four tasks: one MiniLM + four LoRA adapters {shared:.1f} MiB, four merged copies "
          f"{copies:.1f} MiB ({copies / shared:.2f}x)")
    if args.out:
        record = {"command": "cd bench && ../.venv/bin/python serving.py " + " ".join(
                      f"--{k} {v}" for k, v in vars(args).items() if k not in ("quick", "out")),
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                  "ratios_to_single": table, "memory_mib": {"shared_backbone_and_4_lora": shared,
                                                            "four_merged_copies": copies}}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
