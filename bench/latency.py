"""Inference latency of sequential vs parallel adapters (and merged LoRA), and the training step of the scaled
parallel adapter vs the frozen-backbone floor. MiniLM, eval mode, torch.inference_mode.

    cd bench && ../.venv/bin/python latency.py  [--r 96 --threads 2 --repeats 50 --train-repeats 20]

Sizes are equal: parallel and scaled parallel at r on the FFN (L(2rd + r + d)), Pfeiffer at m = r (the same
count exactly), Houlsby at m = r/2 (two per layer: the same matmul FLOPs, +Ld biases). Every variant is timed
round-robin with the others (``common.interleaved_medians``), median of ``--repeats`` runs after warm-up, and
printed as a ratio to the base model (absolute times on a shared machine are not comparable between runs).

``parallel, fused`` is the parallel adapter folded into the FFN's own two GEMMs (``fuse_parallel_ffn``: the FFN
becomes r units wider), which only a parallel adapter allows: it measures what running the branch "at the same
time" as the sublayer can buy on a CPU. Targets: training step of the scaled PA <= 1.15 x the floor.
"""
from __future__ import annotations

import argparse
import copy

import torch

from minipeft import add_adapter, train_adapter
from minipeft.backbones.encoder import Encoder
from minipeft.methods.bottleneck import BottleneckConfig
from minipeft.methods.parallel import ParallelAdapterConfig, ScaledParallelAdapterConfig, fuse_parallel_ffn
from minipeft.lab.train import SequenceClassifier

SHAPES = ((1, 32), (32, 128))  # (batch, tokens), as in the issue


def build_variants(r: int = 96, base: Encoder | None = None) -> dict[str, Encoder]:
    """name -> an eval-mode encoder: base, sequential (Houlsby m=r/2, Pfeiffer m=r), parallel and scaled
    parallel (r, FFN), the scaled one fused, and merged LoRA (when minipeft.methods.lora exists).
    Adapter weights are randomised (at init W_up = 0 and some kernels could skip work)."""
    base = (base or Encoder.from_pretrained()).eval()
    configs = {"houlsby (seq.)": BottleneckConfig(placement="houlsby", bottleneck=r // 2),
               "pfeiffer (seq.)": BottleneckConfig(placement="pfeiffer", bottleneck=r),
               "parallel": ParallelAdapterConfig(r=r),
               "scaled parallel": ScaledParallelAdapterConfig(r=r),
               "scaled par., fused": ScaledParallelAdapterConfig(r=r)}
    variants = {"base": base}
    torch.manual_seed(0)
    for label, config in configs.items():
        model = add_adapter(copy.deepcopy(base), config, "a")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".deltas.a." in n and p.dim() == 2:
                    p.normal_(0, 0.02)
        variants[label] = model
    ids = torch.randint(1000, 2000, (2, 16))
    with torch.no_grad():
        unfused = variants["scaled par., fused"](ids)
        fuse_parallel_ffn(variants["scaled par., fused"], "a")
        assert (variants["scaled par., fused"](ids) - unfused).abs().max() < 1e-4  # the same function
    lora = merged_lora(base, r)
    if lora is not None:
        variants["LoRA merged"] = lora
    return variants


def merged_lora(base: Encoder, r: int):
    """LoRA on W_q, W_v at about the same parameter count (r_lora = r/2), merged and unloaded; None if
    minipeft.methods.lora is not there."""
    try:
        from minipeft.methods.lora import LoRAConfig, merge_and_unload
    except ImportError:
        return None
    model = add_adapter(copy.deepcopy(base), LoRAConfig(r=max(1, r // 2), targets=["q", "v"]), "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora." in n or n.endswith((".A", ".B")):
                p.normal_(0, 0.02)
    return merge_and_unload(model, "lora").eval()


def flops_ratio(variant: str, cfg, r: int, T: int) -> float:
    """Multiply-adds per token relative to the base model (matmuls only): every adapter here adds 2rd per
    layer (Houlsby: 2 · 2(r/2)d), whether it runs before, after or beside the sublayer."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    base = 4 * d * d + 2 * T * d + 2 * d * f  # q,k,v,o + QKᵀ and AV + the FFN
    extra = 0 if variant in ("base", "LoRA merged") else 2 * r * d
    return (base + extra) / base


def latency_table(variants: dict, shapes=SHAPES, repeats: int = 50, warmup: int = 5) -> dict:
    """{(batch, tokens): {variant: median seconds}}; variants timed round-robin for each shape."""
    from common import interleaved_medians

    out = {}
    for batch, tokens in shapes:
        ids = torch.randint(1000, 2000, (batch, tokens), generator=torch.Generator().manual_seed(0))
        fns = {name: (lambda m=m: m(ids)) for name, m in variants.items()}
        with torch.inference_mode():
            out[(batch, tokens)] = interleaved_medians(fns, repeats=repeats, warmup=warmup)
    return out


def format_latency(table: dict, cfg, r: int) -> str:
    shapes = list(table)
    names = list(table[shapes[0]])
    head = "| variant | " + " | ".join(f"{b} x {t}: ms | ratio | FLOPs" for b, t in shapes) + " |"
    rows = [head, "|---|" + "---:|---:|---:|" * len(shapes)]
    for name in names:
        cells = []
        for (b, t) in shapes:
            sec, base = table[(b, t)][name], table[(b, t)]["base"]
            cells.append(f"{sec * 1e3:.1f} | {sec / base:.3f} | {flops_ratio(name, cfg, r, t):.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def training_step_ratios(r: int = 96, repeats: int = 20, batch_size: int = 32, seq: int = 64) -> dict:
    """Seconds per training step (forward, backward, AdamW; train mode) of the frozen-backbone floor, a
    Pfeiffer adapter (m=r) and the scaled parallel adapter (r, FFN), timed round-robin."""
    from common import freeze_to_floor, interleaved_medians, real_batch, training_step

    batch = real_batch(batch_size, seq)
    torch.manual_seed(0)
    base = SequenceClassifier(Encoder.from_pretrained(), num_labels=2).train()
    steps = {}
    floor = copy.deepcopy(base)
    steps["frozen floor"] = training_step(floor, batch, freeze_to_floor(floor))
    for label, config in (("pfeiffer (seq.)", BottleneckConfig(placement="pfeiffer", bottleneck=r)),
                          ("scaled parallel", ScaledParallelAdapterConfig(r=r))):
        model = copy.deepcopy(base)
        add_adapter(model.encoder, config, "a")
        train_adapter(model, "a")
        steps[label] = training_step(model, batch, [p for p in model.parameters() if p.requires_grad])
    return interleaved_medians(steps, repeats=repeats, warmup=3)


def main():
    from common import pin_threads

    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, default=96, help="adapter size (96: 1.97%% of MiniLM on the FFN)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--train-repeats", type=int, default=20)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    pin_threads(args.threads)
    variants = build_variants(args.r)
    cfg = variants["base"].cfg
    table = latency_table(variants, repeats=args.repeats)
    print(f"Inference latency, MiniLM-L6, {args.threads} threads, median of {args.repeats} interleaved runs "
          f"after warm-up; adapters r={args.r} (Houlsby m={args.r // 2}); ratio = variant / base")
    print(format_latency(table, cfg, args.r))
    if "LoRA merged" not in variants:
        print("| LoRA merged | not measured: minipeft/methods/lora.py is not in this checkout |")
    if not args.skip_train:
        t = training_step_ratios(args.r, args.train_repeats)
        print(f"\nTraining step (batch 32 x 64, fwd + bwd + AdamW), median of {args.train_repeats}:")
        for name, sec in t.items():
            print(f"  {name:18s} {sec * 1e3:8.1f} ms   ratio to the frozen floor {sec / t['frozen floor']:.3f}")
        print(f"scaled parallel / floor = {t['scaled parallel'] / t['frozen floor']:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
