"""Step time of QLoRA against LoRA on the fp32 decoder, and what activation checkpointing costs, side by side.

    .venv/bin/python bench/qlora_speed.py [--repeats 5] [--threads 2]   -> results/qlora/speed.json

SmolLM2-135M, one batch of 8 real headline training examples (prompt + headline, ``generation_train.lm_examples``),
the masked LM loss, backward and an AdamW step, for LoRA r=8 on every linear (``lora_all``, fp32) and the same on
NF4 weights (``qlora``), each with and without checkpointing; the four steps timed round-robin
(``common.interleaved_medians``), so load hits all alike. A 4-bit layer dequantizes its W in every forward and
again in the backward (``quant.DequantizedLinear``), a third time with checkpointing (the recomputed forward).
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
from common import bench_arguments, interleaved_medians, pin_threads

from minipeft.backbones.decoder import Decoder
from minipeft.lab.generation_tasks import load_headline
from minipeft.lab.generation_train import decoder_tokenizer, lm_collate, lm_examples, lm_loss
from minipeft.lab.train import Budget
from minipeft.lab.qlora import prepare_qlora

OUT = Path(__file__).resolve().parents[1] / "results" / "qlora" / "speed.json"


def main(argv):
    args = bench_arguments(repeats=5).parse_args(argv)
    pin_threads(args.threads)
    tok, budget = decoder_tokenizer(), Budget.generation()
    batch = lm_collate(lm_examples(load_headline(8, 1, 1)["train"], tok, budget.max_length), tok.pad_token_id)
    base = Decoder.from_pretrained().requires_grad_(False).train()
    models = {}
    for name, quantize in (("lora_all", False), ("qlora", True)):
        torch.manual_seed(0)
        models[name] = copy.deepcopy(base)
        prepare_qlora(models[name], quantize=quantize, name="a")

    def step(model, checkpointing):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def run():
            model.gradient_checkpointing(checkpointing)
            lm_loss(model, batch, "cpu").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    fns = {f"{name}{' ckpt' if ckpt else ''}": step(m, ckpt) for name, m in models.items() for ckpt in (False, True)}
    load_start = os.getloadavg()
    med = interleaved_medians(fns, repeats=args.repeats, warmup=1)
    ratios = {"qlora / lora_all": med["qlora"] / med["lora_all"],
              "qlora ckpt / qlora": med["qlora ckpt"] / med["qlora"],
              "lora_all ckpt / lora_all": med["lora_all ckpt"] / med["lora_all"]}
    record = {"command": "python bench/qlora_speed.py " + " ".join(argv), "threads": args.threads,
              "repeats": args.repeats, "batch": list(batch["input_ids"].shape),
              "load_average": {"start": [round(x, 2) for x in load_start],
                               "end": [round(x, 2) for x in os.getloadavg()]},
              "median_seconds": med, "ratios": ratios}
    for k, v in med.items():
        print(f"{k:>14}: {v:.2f} s/step")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(f"load average at the start {record['load_average']['start']}, at the end {record['load_average']['end']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
