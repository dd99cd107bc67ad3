"""Shared benchmark helpers: one batch of real data, pinned threads, medians of repeated runs.

Benchmarks print ratios measured side by side in one run (these machines are noisy; absolute times are not
comparable across runs). Each timed function is interleaved with the others, round by round.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_arguments(repeats: int = 20) -> argparse.ArgumentParser:
    """The options every benchmark shares (a script adds its own): batch, seq, threads, repeats."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def pin_threads(n: int = 2) -> None:
    torch.set_num_threads(n)


def real_batch(batch_size: int = 32, seq_len: int = 64, task: str = "sentiment") -> dict:
    """``batch_size`` real snippets, tokenised and padded/truncated to exactly ``seq_len`` tokens."""
    from minipeft.lab.tasks import load_task, load_tokenizer

    texts = list(load_task(task)["train"]["text"][: batch_size])
    texts = (texts * (batch_size // len(texts) + 1))[:batch_size]
    enc = load_tokenizer()(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.arange(batch_size) % 2}


def interleaved_medians(fns: dict, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so drift hits all of them alike; every other
    round runs them in reverse order, so no function always runs first (or always right after the same one)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for round_ in range(repeats):
        for name, fn in (fns.items() if round_ % 2 == 0 else reversed(fns.items())):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_step(model, batch, params):
    """A closure doing one forward + backward + AdamW step of ``model`` (a SequenceClassifier-like module
    returning logits) on ``batch``, updating ``params``."""
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        logits = model(batch["input_ids"], batch["attention_mask"])
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def inference(model, batch):
    """A closure doing one forward of ``model`` on ``batch`` without gradients (call ``model.eval()`` first)."""
    def run():
        with torch.no_grad():
            model(batch["input_ids"], batch["attention_mask"])

    return run


def freeze_to_floor(model) -> list:
    """The frozen-backbone floor: every encoder weight frozen, but gradients still flow through every layer
    (only the embedding LayerNorm and the head train). Any method that inserts into every layer pays at least
    this; returns the trainable parameters."""
    model.requires_grad_(False)
    model.encoder.embed.norm.requires_grad_(True)
    model.head.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
