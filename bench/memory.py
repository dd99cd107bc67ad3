"""Where training memory goes: the model of ``minipeft.lab.memory`` against measured peaks, for full fine-tuning,
LoRA (r=8 on W_q, W_v) and QLoRA (NF4 + LoRA r=8 on every linear), each with and without activation
checkpointing, on the encoder (MiniLM) and the decoder (SmolLM2-135M).

    .venv/bin/python bench/memory.py                 # all 12 configurations -> results/memory/memory.json, .png
    .venv/bin/python bench/memory.py --only bert     # one backbone

Each configuration runs in a fresh Python process (``--child``), so that no earlier run's freed memory, allocator
caches or peak leaks into it. Measured there, from /proc/self/status (Linux):

    (with glibc's mmap threshold fixed, ``CHILD_ENV``, so that freed tensors leave the resident set)
    weights      RSS after loading (and quantizing) the model − RSS before, every tensor copied out of the mapped
                 checkpoint file (else its pages would become resident only when first read, in the training
                 steps) and freed memory handed back to the OS (glibc malloc_trim): the loading's temporaries (the
                 fp32 weights QLoRA quantizes) are gone
    training     the peak RSS over two AdamW steps − RSS before them: the peak is reset first (writing 5 to
                 /proc/self/clear_refs resets VmHWM), so it is the training steps' own peak, exact to the page and
                 not sampled. It holds gradients, AdamW's m and v (made by the first step), activations and the
                 backward's transients.

Why RSS: PyTorch's CPU tensors come from malloc (large ones straight from mmap, returned to the OS when freed), so
the resident set follows the live tensors; ``tracemalloc`` only sees Python's own allocator, not the tensors, and
``torch.profiler``'s memory view reports allocations, not the peak of what is resident at once.

The loss is mean(h²) over the last hidden states (it keeps h, nd values, added to the model), so the activations
are the backbone's own and no task head's. Batch: MiniLM 16 × 128 tokens, SmolLM2 4 × 128 (random token ids).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "memory"
SHAPES = {"bert": (16, 128), "llama": (4, 128)}
METHODS = ("full", "lora", "qlora")
MIB = 2 ** 20
# glibc's mmap threshold is dynamic: after a large block is freed it rises (up to 32 MiB), and blocks below it then
# come from the heap, which keeps them resident once freed: RSS would count freed activations. Fixed at 128 KiB,
# every tensor above it is its own mapping, returned to the OS when freed (RSS follows the live tensors).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: 1024 * int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def build(family: str, method: str):
    from minipeft import LoRAConfig, add_adapter, train_adapter
    from minipeft.backbones import REGISTRY
    from minipeft.lab.qlora import prepare_qlora

    model = REGISTRY[family].cls.from_pretrained().train()
    if method == "full":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    if method == "lora":
        add_adapter(model, LoRAConfig(r=8, alpha=16, targets=["q", "v"]), "a")
        train_adapter(model, "a")
    else:
        prepare_qlora(model, quantize=True, name="a")
    return model


def child(family: str, method: str, checkpointing: bool, threads: int) -> dict:
    """One configuration, measured in this (fresh) process."""
    import torch

    from minipeft.lab import memory as M

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    B, T = SHAPES[family]
    trim()
    before_load = status()["VmRSS"]
    model = build(family, method).gradient_checkpointing(checkpointing)
    with torch.no_grad():  # own copies: a tensor still backed by the mapped checkpoint file would page in later
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    trim()
    loaded = status()["VmRSS"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, model.cfg.vocab_size, (B, T))
    mask = torch.ones_like(ids)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS now
    before_steps = status()["VmRSS"]
    for _ in range(2):  # the second step holds AdamW's state from the first
        model(ids, mask).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = status()["VmHWM"]
    modelled = M.training_memory(model, B, T, checkpointing)
    loss_input = 4 * B * T * model.cfg.hidden_size  # mean(h²) keeps h
    return {"family": family, "method": method, "checkpointing": checkpointing, "batch": B, "length": T,
            "trainable": M.trainable_count(model),
            "model_mib": {**{k: v for k, v in modelled.mib().items() if k != "total"},
                          "activations": (modelled.activations + loss_input) / MIB},
            "measured_mib": {"weights": (loaded - before_load) / MIB, "training": (peak - before_steps) / MIB}}


def run_all(families, threads: int) -> list[dict]:
    rows = []
    for family in families:
        for method in METHODS:
            for checkpointing in (False, True):
                cmd = [sys.executable, __file__, "--child", family, method, str(int(checkpointing)),
                       "--threads", str(threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
                if out.returncode:
                    raise RuntimeError(f"{family} {method} checkpointing={checkpointing} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(line(rows[-1]), flush=True)
    return rows


def line(r: dict) -> str:
    m, x = r["model_mib"], r["measured_mib"]
    state = m["gradients"] + m["optimizer"] + m["activations"]
    return (f"{r['family']:>5} {r['method']:>5} {'ckpt' if r['checkpointing'] else '    '} | weights model "
            f"{m['weights']:7.1f} measured {x['weights']:7.1f} | grads {m['gradients']:6.1f} "
            f"adam {m['optimizer']:6.1f} "
            f"activations {m['activations']:7.1f} = training model {state:7.1f} measured {x['training']:7.1f} "
            f"(ratio {x['training'] / state:.2f})")


def plot(rows: list[dict], path: Path) -> None:
    """One stacked bar per configuration (the model: weights, gradients, AdamW, activations) beside one bar of
    the measured weights + training peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("weights", "tab:gray"), ("gradients", "tab:orange"), ("optimizer", "tab:red"),
             ("activations", "tab:blue")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, family, title in zip(axes, ("bert", "llama"), ("MiniLM (encoder)", "SmolLM2-135M (decoder)")):
        rs = [r for r in rows if r["family"] == family]
        for i, r in enumerate(rs):
            bottom = 0.0
            for part, colour in parts:
                v = r["model_mib"][part]
                ax.bar(i - 0.2, v, 0.38, bottom=bottom, color=colour, label=part if i == 0 else None)
                bottom += v
            x = r["measured_mib"]
            ax.bar(i + 0.2, x["weights"], 0.38, color="tab:gray", hatch="//", edgecolor="black")
            ax.bar(i + 0.2, x["training"], 0.38, bottom=x["weights"], color="white", hatch="//", edgecolor="black",
                   label="measured (weights, then the training peak)" if i == 0 else None)
        ax.set_xticks(range(len(rs)), [f"{r['method']}\n{'ckpt' if r['checkpointing'] else ''}" for r in rs])
        ax.set_title(f"{title}, batch {rs[0]['batch']} × {rs[0]['length']}")
        ax.set_ylabel("MiB")
    axes[0].legend(fontsize=8)
    fig.suptitle("Training memory per configuration: the model's four terms (left bar) vs measured (right bar)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--only", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", action="store_true", help="redraw the figure from results/memory/memory.json")
    args = ap.parse_args(argv)
    if args.plot:
        plot(json.loads((OUT / "memory.json").read_text())["rows"], OUT / "memory.png")
        return
    if args.child:
        family, method, ckpt = args.child
        print(json.dumps(child(family, method, bool(int(ckpt)), args.threads)))
        return
    families = [args.only] if args.only else list(SHAPES)
    rows = run_all(families, args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    name = "memory" if not args.only else f"memory_{args.only}"
    load = [round(x, 2) for x in os.getloadavg()]
    (OUT / f"{name}.json").write_text(json.dumps({"command": "python bench/memory.py " + " ".join(argv),
                                                  "load_average_end": load, "rows": rows}, indent=1) + "\n")
    plot(rows, OUT / f"{name}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
