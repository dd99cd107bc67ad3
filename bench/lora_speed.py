"""LoRA speed: (1) a training step, minipeft vs peft; (2) inference latency merged vs unmerged vs base.

    cd bench && ../.venv/bin/python lora_speed.py  [--batch 32 --seq 64 --threads 2 --repeats 20]

(1) LoRA r=8, α=16 on W_q, W_v + a linear head on mean-pooled states, one AdamW step, batch 32 x 64, train
    mode: minipeft's Encoder vs peft on transformers' BertModel (MiniLM, same weights). Target ratio <= 1.0.
    The frozen-backbone floor (bench.common.freeze_to_floor) is printed for scale.
(2) eval mode, no_grad, batch 1 and 32: base model; LoRA unmerged; merged (modules kept, so it can unmerge);
    merge_and_unload (a plain model). Target merged / base <= 1.02 (Hu et al. 2021, §4.1: no added latency).
"""
import copy

import torch
from common import bench_arguments, freeze_to_floor, interleaved_medians, pin_threads, real_batch, training_step
from torch import nn
from transformers import BertModel
from transformers.utils import logging

from minipeft import add_adapter, train_adapter
from minipeft.assets import minilm_path
from minipeft.backbones.encoder import Encoder
from minipeft.methods.lora import LoRAConfig, lora_layers, merge_adapter, merge_and_unload
from minipeft.lab.train import SequenceClassifier


class HFEncoder(nn.Module):
    """transformers' BertModel (with or without peft) behind our encoder's call signature."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.hidden_size = hf, hf.config.hidden_size

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def training_steps(batch, repeats):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ours = SequenceClassifier(Encoder.from_pretrained(), 2)
    add_adapter(ours, LoRAConfig(r=8, alpha=16, targets=["q", "v"]), "lora")
    train_adapter(ours, "lora")
    hf = BertModel.from_pretrained(str(minilm_path()), local_files_only=True, add_pooling_layer=False)
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0))
    theirs = SequenceClassifier(HFEncoder(peft_model), 2)  # peft froze the backbone; the head trains
    floor = SequenceClassifier(Encoder.from_pretrained(), 2)
    models = {"minipeft LoRA": ours, "peft LoRA": theirs, "frozen floor": floor}
    params = {"frozen floor": freeze_to_floor(floor)}
    for name in ("minipeft LoRA", "peft LoRA"):
        params[name] = [p for p in models[name].parameters() if p.requires_grad]
    assert sum(p.numel() for p in params["minipeft LoRA"]) == sum(p.numel() for p in params["peft LoRA"])
    for m in models.values():
        m.train()
    return interleaved_medians({n: training_step(m, batch, params[n]) for n, m in models.items()}, repeats=repeats)


def latencies(batch, repeats):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = Encoder.from_pretrained().eval()
    unmerged = copy.deepcopy(base)
    add_adapter(unmerged, LoRAConfig(r=8, alpha=16, targets=["q", "v"]), "lora")
    with torch.no_grad():
        for m in lora_layers(unmerged, "lora").values():
            m.B.normal_(std=0.02)  # a "trained" adapter
    merged = copy.deepcopy(unmerged)
    merge_adapter(merged, "lora")
    unloaded = merge_and_unload(copy.deepcopy(unmerged))
    models = {"base": base, "LoRA unmerged": unmerged, "LoRA merged": merged, "merge_and_unload": unloaded}

    def forward(model):
        def run():
            with torch.no_grad():
                model(ids, mask)
        return run

    return interleaved_medians({n: forward(m) for n, m in models.items()}, repeats=repeats)


def main():
    ap = bench_arguments()
    args = ap.parse_args()
    pin_threads(args.threads)
    logging.set_verbosity_error()

    t = training_steps(real_batch(args.batch, args.seq), args.repeats)
    print(f"(1) training step, LoRA r=8 q,v + head, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"median of {args.repeats}")
    for name, sec in t.items():
        print(f"  {name:18s} {sec * 1000:8.1f} ms")
    print(f"ratio minipeft/peft: {t['minipeft LoRA'] / t['peft LoRA']:.3f} (target <= 1.0); "
          f"minipeft/floor: {t['minipeft LoRA'] / t['frozen floor']:.3f}")

    for b in (1, args.batch):
        t = latencies(real_batch(b, args.seq), args.repeats * (3 if b == 1 else 1))
        print(f"(2) inference latency, batch {b} x {args.seq}, eval, no_grad")
        for name, sec in t.items():
            print(f"  {name:18s} {sec * 1000:8.2f} ms   / base {sec / t['base']:.3f}")
        print(f"ratio merged/base at batch {b}: {t['LoRA merged'] / t['base']:.3f}; merge_and_unload/base: "
              f"{t['merge_and_unload'] / t['base']:.3f} (target <= 1.02)")


if __name__ == "__main__":
    main()
