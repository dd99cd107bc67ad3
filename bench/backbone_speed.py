"""minipeft's Encoder vs transformers' BertModel (MiniLM, same weights): forward and forward+backward.

    .venv/bin/python bench/backbone_speed.py  [--batch 32 --seq 64 --threads 2 --repeats 20]
Target: ours / theirs <= 1.05 for both.
"""

import torch
from common import bench_arguments, interleaved_medians, pin_threads, real_batch
from transformers import BertModel
from transformers.utils import logging

from minipeft.assets import minilm_path
from minipeft.backbones.encoder import Encoder


def main():
    ap = bench_arguments()
    args = ap.parse_args()
    pin_threads(args.threads)
    logging.set_verbosity_error()
    batch = real_batch(args.batch, args.seq)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = Encoder.from_pretrained().train()  # train mode for both: dropout on, as in fine-tuning
    theirs = BertModel.from_pretrained(str(minilm_path()), local_files_only=True, add_pooling_layer=False).train()

    def forward(model, call):
        def run():
            with torch.no_grad():
                call(model)
        return run

    def forward_backward(model, call):
        def run():
            call(model).pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    call_ours = lambda m: m(ids, mask)  # noqa: E731
    call_theirs = lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    t = interleaved_medians({
        "ours fwd": forward(ours, call_ours), "transformers fwd": forward(theirs, call_theirs),
        "ours fwd+bwd": forward_backward(ours, call_ours), "transformers fwd+bwd": forward_backward(theirs, call_theirs),
    }, repeats=args.repeats)
    print(f"batch {args.batch} x {args.seq} tokens, {args.threads} threads, median of {args.repeats}")
    for name, sec in t.items():
        print(f"  {name:22s} {sec * 1000:8.1f} ms")
    print(f"ratio ours/transformers  forward: {t['ours fwd'] / t['transformers fwd']:.3f}   "
          f"forward+backward: {t['ours fwd+bwd'] / t['transformers fwd+bwd']:.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
