"""The cost columns of the design document's table, measured side by side for every registered method.

    cd bench && ../.venv/bin/python costs.py [--repeats 10] [--out ../results/costs.json]
    cd bench && ../.venv/bin/python costs.py --check ../results/costs.json     # rerun, compare the ratios

Each method's task model comes from ``compare.build_model`` (the recipe ``compare`` trains). Timed round-robin
(``common.interleaved_medians``, medians), on one real sentiment batch:
- training step (forward, backward, AdamW on what the recipe trains; train mode), and its ratio to full
  fine-tuning's step;
- inference at batch 1 and batch 32 (x 64 tokens) of the *deployed* model (``minipeft.for_inference``: LoRA
  merged, prefix MLPs dropped; eval mode, no gradients), as a ratio to the pretrained model alone;
- ``merges``: nothing of the adapter is left after deployment (inference costs exactly the base model's).
Ratios, not absolute times, are comparable across runs; the file records the machine and its load average.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from common import bench_arguments, inference, interleaved_medians, pin_threads, real_batch, training_step

from minipeft.api import adapter_modules, for_inference
from minipeft.backbones.encoder import Encoder
from minipeft.core import in_lesson_order
from minipeft.lab.compare import build_model, machine
from minipeft.lab.records import check_output_dir, read_json, write_atomic, write_json

SHAPES = {"batch 1": 1, "batch 32": 32}


def measure(methods: list[str], seq: int, repeats: int) -> dict:
    encoder = Encoder.from_pretrained()
    batch = real_batch(32, seq)
    steps, infer, rows = {}, {s: {} for s in SHAPES}, {}
    base = build_model("head", encoder=copy.deepcopy(encoder)).eval()  # the pretrained model with a head
    for shape, n in SHAPES.items():
        infer[shape]["base"] = inference(base, {k: v[:n] for k, v in batch.items()})
    for name in methods:
        model = build_model(name, encoder=copy.deepcopy(encoder)).train()
        steps[name] = training_step(model, batch, [p for p in model.parameters() if p.requires_grad])
        deployed = for_inference(copy.deepcopy(model))
        # each tensor once: Compacter's A is one tensor shared by every adapter of the model
        kept = {id(p): p for m in adapter_modules(deployed).values() for p in m.parameters()}
        left = sum(p.numel() for p in kept.values())
        rows[name] = {"merges": left == 0, "inference_params": left}
        for shape, n in SHAPES.items():
            infer[shape][name] = inference(deployed, {k: v[:n] for k, v in batch.items()})
    step_s = interleaved_medians(steps, repeats=repeats)
    for name in methods:
        rows[name].update(step_s=step_s[name], step_vs_full=step_s[name] / step_s["full"])
    for shape, fns in infer.items():
        with torch.inference_mode():
            t = interleaved_medians(fns, repeats=3 * repeats)
        for name in methods:
            rows[name][f"{shape} s"] = t[name]
            rows[name][f"{shape} vs base"] = t[name] / t["base"]
    return rows


def markdown(record: dict) -> str:
    head = ("| method | train step s | vs full | merges | left at inference | batch 1 vs base | batch 32 vs base |\n"
            "|---|---:|---:|---|---:|---:|---:|\n")
    return head + "".join(
        f"| {m} | {r['step_s']:.3f} | {r['step_vs_full']:.2f} | {'yes' if r['merges'] else 'no'} "
        f"| {r['inference_params']:,} | {r['batch 1 vs base']:.2f} | {r['batch 32 vs base']:.2f} |\n"
        for m, r in record["methods"].items())


def check(old: dict, new: dict) -> None:
    """Print each ratio of ``old`` next to the rerun's and the largest relative difference."""
    worst = 0.0
    for m, r in new["methods"].items():
        o = old["methods"].get(m)
        if o is None:
            continue
        rel = r["step_vs_full"] / o["step_vs_full"] - 1
        worst = max(worst, abs(rel))
        print(f"{m:16s} step vs full: committed {o['step_vs_full']:.3f}, rerun {r['step_vs_full']:.3f} ({rel:+.1%})")
    print(f"largest relative difference of the s/step ratios: {worst:.1%} (target <= 10%); load average "
          f"committed {old['machine']['load_average']}, rerun {new['machine']['load_average']}")


def main(argv=None):
    ap = bench_arguments(repeats=10)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--out", default=None, help="write the record here (json, and .md next to it)")
    ap.add_argument("--check", default=None, help="a committed costs.json to compare this run's ratios with")
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    try:  # the files, before minutes of measuring
        if args.out:
            check_output_dir(Path(args.out).parent, (Path(args.out).name, Path(args.out).with_suffix(".md").name))
        committed = read_json(args.check) if args.check else None
    except ValueError as e:
        ap.error(str(e))
    methods = args.methods or in_lesson_order()
    if "full" not in methods:
        methods = ["full"] + methods
    started = machine()
    rows = measure(methods, args.seq, args.repeats)
    ended = machine()
    record = {"command": "cd bench && ../.venv/bin/python costs.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "shape": {"batch": 32, "tokens": args.seq, "inference batches": list(SHAPES.values())},
              "repeats": args.repeats, "machine": {**ended, "load_average": {
                  "start": started["load_average"], "end": ended["load_average"]}},
              "versions": {"torch": torch.__version__}, "methods": rows}
    print(markdown(record))
    print(f"load average (1, 5, 15 min): start {started['load_average']}, end {record['machine']['load_average']['end']}")
    if args.out:
        out = Path(args.out)
        write_json(out, record)
        write_atomic(out.with_suffix(".md"),
            f"# Costs, measured side by side\n\n{markdown(record)}\nCommand: `{record['command']}`; training step on "
            f"32 x {args.seq} tokens, median of {args.repeats} round-robin repeats; inference median of "
            f"{3 * args.repeats}. Machine: {record['machine']}\n")
    if args.check:
        check(committed, record)
    return record


if __name__ == "__main__":
    main()
