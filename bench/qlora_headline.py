"""QLoRA against LoRA on the fp32 decoder on the headline task: the same adapter (LoRA r=8, α=16 on every linear of
every block, ``minipeft.lab.qlora``), the same learning rate, budget and seeds; only the stored weights differ
(NF4 with double quantization vs fp32).

    .venv/bin/python bench/qlora_headline.py probe 1e-3,3e-3   # the learning rate, on validation (fp32 twin)
    .venv/bin/python bench/qlora_headline.py run --seeds 0 1 2  # the runs -> results/qlora/comparison.json (.md, .png)
    .venv/bin/python bench/qlora_headline.py run --methods qlora --seeds 1 2 --add   # more runs into the record
    .venv/bin/python bench/qlora_headline.py summary            # ROUGE-L paired test, memory and step-time ratios

``probe``: as ``bench/headline_lr_probe.py`` (12 steps of 8 training articles, then the masked LM loss on 32
validation articles; the lowest wins), for the fp32 twin; the output goes to results/qlora/lr_probe.txt.
``run``: per seed, ``lora_all`` (fp32) then ``qlora`` through ``generation_train.train_lm`` (the headline's loop,
budget ``Budget.generation()``), written after each run as ``compare`` writes results/headline: the record also
holds results/headline's ``zero_shot`` run (the baseline of the table's paired column) and its ``lora`` (r=8 on
W_q, W_v) runs, copied when that record's budget is this one. ``summary``: QLoRA vs its fp32 twin, paired on the
per-article ROUGE-L of the same seeds (``minipeft.lab.stats.compare_scores``), and the ratios of their medians of
s/step and of their measured training memory, from the same record (the runs alternate, so load hits both alike).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from common import pin_threads

from minipeft.backbones.decoder import Decoder
from minipeft.lab.compare import machine, write_results
from minipeft.lab.records import read_record
from minipeft.lab.train import Budget, Result, seed_everything
from minipeft.lab.qlora import LR, prepare_qlora, qlora_config

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "qlora"
HEADLINE = ROOT / "results" / "headline" / "comparison.json"
METHODS = {"qlora": True, "lora_all": False}  # name -> quantized (QLoRA first: each seed pairs up as it ends)


def build(method: str, seed: int):
    """Seed, load SmolLM2-135M-Instruct frozen, attach the adapter (quantizing first for QLoRA)."""
    seed_everything(seed)
    model = Decoder.from_pretrained().requires_grad_(False)
    prepare_qlora(model, quantize=METHODS[method], name=method)
    return model


def probe(rates: str) -> None:
    from headline_lr_probe import probe as probe_lr, probe_data

    probe_data()  # before any model: loading draws from torch's generator
    lines = [f"# {' '.join(['bench/qlora_headline.py'] + sys.argv[1:])} (2 threads)"]
    for lr in map(float, rates.split(",")):
        val, losses = probe_lr(build("lora_all", 0), lr)
        lines.append(f"lora_all lr {lr:g}: validation loss {val:.3f}; training losses {losses}")
        print(lines[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lr_probe.txt").write_text("\n".join(lines) + "\n")


def headline_runs(budget: Budget) -> list[Result]:
    """results/headline's zero_shot and lora runs, if recorded with ``budget``."""
    if not HEADLINE.exists():
        return []
    record = read_record(HEADLINE)
    if record["budget"] != asdict(budget):
        print(f"{HEADLINE} has another budget: its runs are not copied")
        return []
    return [Result.from_dict(d) for d in record["results"] if d["method"] in ("zero_shot", "lora")]


def run(seeds: list[int], methods: list[str], add: bool) -> None:
    """Each method per seed (seed-major); ``add``: keep the runs already in results/qlora (a run made again
    replaces its earlier one)."""
    from minipeft.lab.generation_train import train_lm

    budget, started = Budget.generation(), machine()
    command = "python bench/qlora_headline.py " + shlex.join(sys.argv[1:])
    copied = headline_runs(budget)
    results: list[Result] = []
    if add and (OUT / "comparison.json").exists():
        record = read_record(OUT / "comparison.json")
        if record["budget"] != asdict(budget):
            raise ValueError(f"--add: {OUT / 'comparison.json'} has another budget")
        again = {(m, s) for m in methods for s in seeds}
        results = [Result.from_dict(d) for d in record["results"]
                   if d["method"] in METHODS and (d["method"], d["seed"]) not in again]
    planned = len(results) + len(seeds) * len(methods)
    for seed in seeds:
        for method in methods:
            model = build(method, seed)
            config = {**asdict(qlora_config(model)), "quantized": METHODS[method]}
            r = train_lm(model, "headline", LR, budget, seed, method, config, quiet=True)
            results.append(r)
            print(f"{method} seed {seed}: test ROUGE-L {100 * r.test_acc:.1f}, {r.sec_per_step:.2f} s/step, "
                  f"{r.peak_memory_mb:.0f} MiB, {r.train_seconds:.0f} s", flush=True)
            write_results(copied + results, OUT, command, planned=planned + len(copied), started=started)
            del model


def summary(write: bool = True) -> dict:
    """QLoRA against each fp32 LoRA in the record (its twin ``lora_all``; the headline's ``lora`` on W_q, W_v), on
    the seeds both have: the paired ROUGE-L test, and the ratios of the medians of s/step and of the measured
    training memory (each run's peak RSS rise, ``train.PeakMemory``). Written to results/qlora/summary.json."""
    from minipeft.lab.generation_tasks import rouge_per_example
    from minipeft.lab.stats import compare_scores

    record = read_record(OUT / "comparison.json")
    runs: dict[str, dict[int, dict]] = {}
    for d in record["results"]:
        runs.setdefault(d["method"], {})[d["seed"]] = d
    per = lambda d: rouge_per_example(d["test_predictions"], record["test_labels"])["rougeL"]  # noqa: E731
    out = {}
    for other in ("lora_all", "lora"):
        seeds = sorted(set(runs.get("qlora", {})) & set(runs.get(other, {})))
        if not seeds:
            continue
        c = compare_scores([per(runs["qlora"][s]) for s in seeds], [per(runs[other][s]) for s in seeds])
        med = lambda m, k: statistics.median(runs[m][s][k] for s in seeds)  # noqa: E731
        out[f"qlora vs {other}"] = {
            "seeds": seeds, "rougeL": {m: [runs[m][s]["test_acc"] for s in seeds] for m in ("qlora", other)},
            "paired": {"difference": c.difference, "low": c.low, "high": c.high, "p_t": c.p_t, "verdict": c.verdict},
            "sec_per_step": {m: med(m, "sec_per_step") for m in ("qlora", other)},
            "peak_memory_mb": {m: med(m, "peak_memory_mb") for m in ("qlora", other)},
            "step_time_ratio": med("qlora", "sec_per_step") / med(other, "sec_per_step"),
            "memory_ratio": med("qlora", "peak_memory_mb") / med(other, "peak_memory_mb")}
    print(json.dumps(out, indent=1))
    if write:
        (OUT / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv):
    pin_threads(2)
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["probe", "run", "summary"])
    ap.add_argument("rates", nargs="?", default="1e-3,3e-3")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--add", action="store_true", help="keep the runs results/qlora already holds")
    args = ap.parse_args(argv)
    {"probe": lambda: probe(args.rates), "run": lambda: run(args.seeds, args.methods, args.add),
     "summary": summary}[args.what]()


if __name__ == "__main__":
    main(sys.argv[1:])
