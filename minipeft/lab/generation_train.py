"""Training the decoder with adapters on a generation task, and scoring what it writes (the ``headline`` task).

    model = build_lm("lora", seed=0)     # SmolLM2-135M-Instruct, frozen, + the recipe's adapter (the only part trained)
    result = train_lm(model, "headline", lr=GENERATION_LRS["lora"], budget=Budget.for_generation(), seed=0)
    result.test_acc, result.test_scores  # ROUGE-L F1 on the test split; ROUGE-1/2/L (``result.metric`` says which)

Objective: the conditional language-model loss of Li & Liang (2021, §3, "max_φ log p_φ(y | x) = Σ_{i ∈ Y_idx}
log p_φ(z_i | h_<i)"): z = [prompt x; headline y; end-of-turn], teacher-forced, and only the positions of y and of
the end-of-turn token that closes it are scored, the prompt's are masked out:

    L = −(1 / Σ_b m_b) Σ_b Σ_{i ∈ Y_idx(b)} log softmax(W_e h_{i−1})[z_i]        (mean over scored tokens)

Only those positions go through the output embedding W_e (49,152 × 576): the logits of the prompt are never built.
The loop is ``minipeft.lab.train``'s (AdamW, linear warm-up and decay, clipping, the same ``Budget`` and ``Result``);
after each epoch the validation headlines are written greedily and scored (``val_acc`` holds their ROUGE-L), and
at the end the test split's (``test_acc`` = ROUGE-L F1, ``test_predictions`` = the headlines, for paired tests).
``zero_shot`` trains nothing: the instruct model prompted as it is, the baseline.

Budget (``Budget.for_generation()``): ``max_length`` is the body's token budget in the prompt
(``generation_tasks.headline_prompt``), ``max_train`` examples seen ``epochs`` times at ``batch_size``;
``eval_batch_size`` prompts are decoded together.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..api import stored_count
from ..backbones.contract import find_backbone
from ..generation import generate
from .generation_tasks import GENERATION_TASKS, HEADLINE_NEW_TOKENS, headline_prompt, load_headline, rouge
from .train import (Budget, PeakMemory, Result, backbone_parameter_count, check_budget, check_lr, count_parameters,
                    default_device, make_optimizer, run_epochs, seed_everything, training_state_bytes,
                    versions)

IGNORE = -100  # label of a position that is not scored (the prompt, the padding)

# The methods compared on a generation task, in the course's order; None = nothing trained.
# Learning rates for Budget.generation(): the lowest validation loss after 12 steps of 8 articles, of two to five
# tried per method (``bench/headline_lr_probe.py``; its output is results/headline/lr_probe.txt).
GENERATION_LRS: dict[str, float | None] = {"zero_shot": None, "lora": 3e-3, "prefix": 1e-3, "mam": 1e-3,
                                            "ia3": 3e-2, "dora": 3e-3, "prompt_tuning": 3e-2}


@lru_cache(maxsize=1)
def decoder_tokenizer():
    from ..backbones.decoder import load_decoder_tokenizer

    return load_decoder_tokenizer()


def build_lm(method: str = "zero_shot", seed: int = 0, decoder=None) -> nn.Module:
    """Seed, load SmolLM2-135M-Instruct (or use ``decoder``), freeze it and attach ``method``'s registered recipe
    (``minipeft.core.RECIPES``: its config and size), the only part that trains; ``zero_shot`` attaches nothing."""
    from ..api import apply_recipe
    from ..backbones.decoder import Decoder
    from ..core import get_recipe

    if method not in GENERATION_LRS:
        raise ValueError(f"method {method!r} is not compared on generation tasks; allowed: {list(GENERATION_LRS)}")
    seed_everything(seed)
    model = decoder if decoder is not None else Decoder.from_pretrained()
    model.requires_grad_(False)
    if method != "zero_shot":
        apply_recipe(model, get_recipe(method))
    return model


# ---- data ----------------------------------------------------------------------------------------------------

def lm_examples(split, tokenizer, body_tokens: int) -> list[dict]:
    """Per article: ``input_ids`` = prompt + headline + end-of-turn, ``labels`` = the same ids with the prompt's
    set to IGNORE (``generation_tasks.headline_prompt`` builds the prompt)."""
    end = tokenizer.eos_token_id  # <|im_end|>: closes the assistant's turn, so the model learns to stop
    out = []
    for body, headline in zip(split["body"], split["headline"]):
        prompt = headline_prompt(tokenizer, body, body_tokens)
        target = tokenizer(headline, add_special_tokens=False)["input_ids"] + [end]
        out.append({"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target})
    return out


def lm_collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example: (B, T) ids, attention mask and labels (IGNORE on the padding)."""
    T = max(len(e["input_ids"]) for e in examples)
    pad = lambda xs, v: xs + [v] * (T - len(xs))  # noqa: E731
    return {"input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
            "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
            "labels": torch.tensor([pad(e["labels"], IGNORE) for e in examples])}


def lm_loss(model: nn.Module, batch: dict, device, backbone=None) -> torch.Tensor:
    """The masked conditional LM loss (module docstring): hidden state t predicts token t + 1, scored only where
    token t + 1 is a headline token; logits only at those positions. ``backbone``: whose output embedding scores
    them (default ``model``'s; pass it when ``model`` is a DDP / autocast wrapper)."""
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    hidden = model(ids, batch["attention_mask"].to(device))  # (B, T, d)
    scored = labels[:, 1:] != IGNORE  # (B, T - 1)
    logits = (backbone or find_backbone(model)).logits(hidden[:, :-1][scored])  # (N, V), N = scored tokens in the batch
    return F.cross_entropy(logits.float(), labels[:, 1:][scored])


def write_headlines(model: nn.Module, bodies, tokenizer, budget: Budget, progress: bool = False) -> list[str]:
    """Greedy headlines (at most ``HEADLINE_NEW_TOKENS`` tokens, stopping at end-of-turn) for ``bodies``, decoded
    ``budget.eval_batch_size`` at a time with the KV cache."""
    from tqdm import tqdm

    prompts = [headline_prompt(tokenizer, body, budget.max_length) for body in bodies]
    texts = []
    starts = range(0, len(prompts), budget.eval_batch_size)
    for i in tqdm(starts, disable=not progress, desc="writing headlines", mininterval=2.0):
        texts += generate(model, prompts[i:i + budget.eval_batch_size], tokenizer,
                          max_new_tokens=HEADLINE_NEW_TOKENS).texts
    return [t.strip() for t in texts]


# ---- training (the loop is ``minipeft.lab.train.run_epochs``, every kind's) ---------------------------------

def train_lm(model: nn.Module, task: str = "headline", lr: float | None = None, budget: Budget | None = None,
             seed: int = 0, method: str = "", config: dict | None = None, quiet: bool = False, tokenizer=None,
             device=None, distributed=None) -> Result:
    """Train ``model``'s trainable parameters (none: zero-shot, evaluation only) on generation ``task`` with the
    masked LM loss; score validation after each epoch and the test split at the end by ROUGE; return a Result.
    ``distributed``: as in ``minipeft.lab.train.train`` (DDP slice of each batch and/or bf16 autocast)."""
    from torch.utils.data import DataLoader

    if task not in GENERATION_TASKS:
        raise ValueError(f"unknown generation task {task!r}; available: {list(GENERATION_TASKS)}")
    budget = check_budget(Budget.for_generation() if budget is None else budget, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if params or lr is not None:  # zero-shot (nothing trainable) takes lr=None
        check_lr(lr)
    tokenizer = tokenizer or decoder_tokenizer()
    seed_everything(seed)
    device = torch.device(device) if device is not None else default_device()
    dd = load_headline(budget.max_train, budget.max_eval, budget.max_test)
    loader = DataLoader(lm_examples(dd["train"], tokenizer, budget.max_length), batch_size=budget.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(seed),
                        collate_fn=lambda b: lm_collate(b, tokenizer.pad_token_id))

    def validation_rouge_l() -> float:
        return rouge(write_headlines(model, dd["validation"]["body"], tokenizer, budget),
                     list(dd["validation"]["headline"]))["rougeL"]

    model.to(device).train()
    net, backbone = model, find_backbone(model)  # net: the model, or its DDP / autocast wrapper
    if distributed is not None and params:
        loader, net = distributed.prepare(loader, model, seed)
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        if params:
            opt, sched = make_optimizer(params, lr, budget, total_steps=budget.epochs * len(loader))
            losses, step_times, val_scores = run_epochs(
                net, params, opt, sched, loader, validation_rouge_l, budget, device,
                desc=f"{method or 'train'} on {task}", quiet=quiet, metric="val_rougeL",
                loss_fn=lambda m, batch, dev: lm_loss(m, batch, dev, backbone))
        else:  # zero-shot: one validation score, of the model as it is
            losses, step_times, val_scores = [], [], [validation_rouge_l()]
    if distributed is not None and params:
        losses = distributed.global_losses(losses)
    headlines = write_headlines(model, dd["test"]["body"], tokenizer, budget, progress=not quiet)
    scores = rouge(headlines, list(dd["test"]["headline"]))

    timed = step_times[budget.timing_warmup_steps:] or step_times
    n_total, n_train = count_parameters(model), count_parameters(model, trainable_only=True)
    n_stored, n_backbone = stored_count(model), backbone_parameter_count(find_backbone(model))
    return Result(task=task, method=method, config=dict(config or {}), seed=seed, lr=lr or 0.0,
                  budget=asdict(budget), val_acc=val_scores, test_acc=scores["rougeL"], losses=losses,
                  steps=len(losses), sec_per_step=statistics.median(timed) if timed else math.nan,
                  train_seconds=time.perf_counter() - start, peak_memory_mb=mem.peak_mb,
                  memory_measure=mem.measure, train_state_mb=training_state_bytes(n_total, n_train) / 2**20,
                  trainable_params=n_train, stored_params=n_stored, total_params=n_total,
                  backbone_params=n_backbone, trainable_pct=100 * n_train / n_backbone,
                  stored_pct=100 * n_stored / n_backbone, device=str(device), versions=versions(),
                  test_predictions=headlines, metric="rougeL", test_scores=scores)
