"""Greedy decoding with and without the KV cache (minipeft.generate on SmolLM2-135M-Instruct, batch 1).

    .venv/bin/python bench/generation_speed.py  [--prompt-tokens 160 --new-tokens 32 --threads 2 --repeats 5]
    .venv/bin/python bench/generation_speed.py --quick      # one timed round, no warm-up: does it run?

Without the cache every step runs the whole sequence again (prompt + tokens so far); with it, the prompt once and
then one token per step. Target: uncached / cached >= 3 for 32 new tokens after a 160-token prompt. Both decode
the same tokens (checked here); times are interleaved medians, so drift hits both alike.
"""

import torch
from common import bench_arguments, interleaved_medians, pin_threads

from minipeft.backbones.decoder import Decoder, load_decoder_tokenizer
from minipeft.generation import generate


def headline_prompt(tok, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of real BBC headlines, one per line."""
    from minipeft.lab.tasks import load_task

    stream = tok("\n".join(load_task("topic")["train"]["text"][:200]))["input_ids"]
    return stream[:n_tokens]


def main():
    ap = bench_arguments(repeats=5)
    ap.add_argument("--prompt-tokens", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="one timed round, no warm-up")
    args = ap.parse_args()
    pin_threads(args.threads)
    repeats, warmup = (1, 0) if args.quick else (args.repeats, 1)
    model = Decoder.from_pretrained()
    prompt = [headline_prompt(load_decoder_tokenizer(), args.prompt_tokens)]

    def decode(use_cache):
        return lambda: generate(model, prompt, max_new_tokens=args.new_tokens, stop_at_eos=False,
                                use_cache=use_cache).tokens

    same = decode(True)() == decode(False)()
    t = interleaved_medians({"cached": decode(True), "uncached": decode(False)}, repeats=repeats, warmup=warmup)
    print(f"greedy, batch 1, {len(prompt[0])}-token prompt + {args.new_tokens} new tokens, {args.threads} threads, "
          f"median of {repeats}; same tokens: {same}")
    for name, sec in t.items():
        print(f"  {name:10s} {sec:8.2f} s  ({sec / args.new_tokens * 1000:.0f} ms/token)")
    print(f"ratio uncached/cached: {t['uncached'] / t['cached']:.2f} (target >= 3)")


if __name__ == "__main__":
    with torch.no_grad():
        main()
