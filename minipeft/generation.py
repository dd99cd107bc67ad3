"""Decoding with a decoder backbone: greedy or sampled (temperature, top-p), KV cache, batched prompts.

    tokens ~ p(x_t | x_<t) = softmax(z_t / τ)      z_t = logits(decoder(x_<t))[-1]

Greedy takes argmax z_t each step. Sampling draws from softmax(z_t / τ) (temperature τ, Holtzman et al. 2020,
§3.3, Eq. 4), restricted to the nucleus when top_p < 1: the smallest set V^(p) of most likely tokens with
Σ_{x ∈ V^(p)} p(x) ≥ p, renormalised (Holtzman et al. 2020, §3.1, Eq. 2-3).

KV cache: under the causal mask (Vaswani et al. 2017, §3.2.3) the keys and values of tokens < t do not depend on
token t, so storing them (the "KV cache", e.g. Pope et al. 2023, "Efficiently Scaling Transformer Inference")
only avoids recomputing them: the same math, one new token per step instead of the whole sequence.
``use_cache=False`` recomputes everything each step (the reference the tests compare against).

Batches are left-padded: every prompt ends in the last column, so each step appends one column for all rows.
The decoder numbers real tokens 0..n-1 for RoPE and never attends to padding, so a prompt decodes to the same
tokens alone or in a batch. Adapters work as attached: a prefix's keys/values enter the cache on the first call,
in front of the prompt (``result.cache.layers[i].prefix_len``); a LoRA may be merged (``merge_adapter``,
``for_inference``) first: W = W0 + (α/r)BA is the same function, so the tokens are the same.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import nn

from .backbones.contract import find_backbone, per_example


@dataclass
class Generation:
    """Per prompt: ``tokens`` the new token ids (ending with the EOS token when decoding stopped there),
    ``texts`` those tokens decoded without special tokens (when a tokenizer was given, else None),
    ``stopped_at_eos`` whether EOS ended it (else the token limit did). ``cache``: the KV cache (use_cache)."""

    tokens: list[list[int]]
    texts: list[str] | None
    stopped_at_eos: list[bool]
    cache: object | None = None


def generate(model: nn.Module, prompts, tokenizer=None, *, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, eos_token_id=None,
             stop_at_eos: bool = True, use_cache: bool = True, progress: bool = False,
             adapter_names=None) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    ``prompts``: a list of strings (with ``tokenizer``) or of token-id lists. ``do_sample``: draw from
    softmax(z/temperature) restricted to the top-p nucleus, with ``seed`` for a reproducible draw; else greedy.
    ``eos_token_id`` (int or list of ints; default: the tokenizer's, else the model config's) ends a prompt's
    continuation where it appears, unless ``stop_at_eos=False``. ``progress``: a tqdm bar over the steps.
    ``adapter_names``: one adapter name (or "base") per prompt, each continued by its own adapter alone, in one
    batch (``per_example``); None: the active adapters for every prompt.
    Bad input raises ValueError / TypeError before anything runs; the model is left as it was in every case
    (generation runs in eval mode without gradients, and the modules' train/eval flags are restored)."""
    backbone = decoder_backbone(model)
    check_options(max_new_tokens, do_sample, temperature, top_p, seed, stop_at_eos, use_cache, progress)
    prompt_ids = tokenize(prompts, tokenizer, backbone.cfg.vocab_size)
    context = backbone.cfg.max_position
    longest = max(map(len, prompt_ids))
    if longest > context:
        i = max(range(len(prompt_ids)), key=lambda b: len(prompt_ids[b]))
        raise ValueError(f"prompt {i} has {longest} tokens, longer than the context of {context} positions "
                         f"(max_position): allowed is prompt tokens + max_new_tokens <= {context}")
    if longest + max_new_tokens > context:
        raise ValueError(f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} that needs "
                         f"{longest + max_new_tokens} positions, but the context holds {context}: allowed is "
                         "prompt tokens + max_new_tokens <= context (shorten the prompt or max_new_tokens)")
    eos = stop_tokens(eos_token_id, tokenizer, backbone.cfg) if stop_at_eos else set()

    if adapter_names is not None and len(adapter_names) != len(prompt_ids):
        raise ValueError(f"adapter_names names {len(adapter_names)} adapters for {len(prompt_ids)} prompts: give one "
                         "per prompt")
    routing = per_example(model, adapter_names) if adapter_names is not None else nullcontext()
    flags = [m.training for m in model.modules()]
    model.eval()  # e.g. no LoRA dropout while decoding
    try:
        with torch.no_grad(), routing:
            tokens, stopped, cache = decode(backbone, prompt_ids, max_new_tokens, do_sample, temperature, top_p,
                                            seed, eos, use_cache, progress)
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag
    texts = None if tokenizer is None else [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generation(tokens, texts, stopped, cache)


def decode(backbone, prompt_ids, max_new_tokens, do_sample, temperature, top_p, seed, eos, use_cache, progress):
    """The decoding loop on validated input: returns (new tokens per prompt, stopped at EOS, cache or None)."""
    from tqdm import tqdm

    device = next(backbone.parameters()).device
    pad_id = backbone.cfg.pad_token_id or 0  # any id: padding is never attended
    ids, mask = left_pad(prompt_ids, pad_id, device)  # (B, T)
    B = ids.shape[0]
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    cache = backbone.new_cache() if use_cache else None
    new, stopped = [[] for _ in range(B)], [False] * B  # stopped: EOS emitted
    step_input, step_mask = ids, mask  # cached: the whole prompt once, then one token per step
    bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress, mininterval=2.0,
               miniters=max(1, max_new_tokens // 20))  # at most ~20 updates: notebooks store every one
    try:
        for _ in range(max_new_tokens):
            if use_cache:
                hidden = backbone(step_input, step_mask, cache=cache)[:, -1]  # (B, d)
            else:  # recompute the whole sequence: the same logits, up to fp32 rounding
                hidden = backbone(ids, mask)[:, -1]
            logits = backbone.logits(hidden)  # (B, V): z_t, the last position of each row (left padding)
            token = sample(logits, temperature, top_p, generator) if do_sample else logits.argmax(-1)  # (B,)
            for b, t in enumerate(token.tolist()):
                if not stopped[b]:
                    new[b].append(t)
                    stopped[b] = t in eos
            bar.update()
            if all(stopped):
                break
            step_input, step_mask = token[:, None], torch.ones_like(token[:, None])  # finished rows: ignored
            if not use_cache:
                ids, mask = torch.cat([ids, step_input], 1), torch.cat([mask, step_mask], 1)
    finally:
        bar.close()
    return new, stopped, cache


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): softmax(z/τ) (Holtzman et al. 2020, Eq. 4), cut to the nucleus
    when top_p < 1 (Eq. 2-3), drawn with ``generator``. Any τ > 0: as τ → 0 it tends to greedy decoding (uniform
    over the tokens that tie for the largest logit)."""
    z = logits.double()  # τ as small as 5e-324 (a double's smallest) stays > 0; in fp32 it would round to 0
    # softmax is shift-invariant: softmax(z/τ) = softmax((z − max z)/τ) (Goodfellow et al. 2016, "Deep Learning",
    # §4.1). Shifted, every exponent is ≤ 0 and the largest is exactly 0: z/τ itself overflows to inf for a tiny τ
    # (inf − inf = nan inside softmax), (z − max z)/τ only goes to −inf, whose exp is 0.
    probs = torch.softmax((z - z.amax(-1, keepdim=True)) / temperature, dim=-1)  # exp(z_x/τ) / Σ_x' exp(z_x'/τ)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # ties keep argmax's first index
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        # V^(p): the smallest top set with Σ p ≥ top_p = every token whose predecessors sum to < top_p (Eq. 2)
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # multinomial renormalises: Eq. 3
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---- input checks and preparation ------------------------------------------------------------------------

def decoder_backbone(model: nn.Module):
    """The model's backbone if it can decode (a causal LM head ``logits`` and a KV cache), else a TypeError."""
    try:
        backbone = find_backbone(model)
    except TypeError:
        backbone = model
    if not (hasattr(backbone, "logits") and hasattr(backbone, "new_cache")):
        raise TypeError(f"generation needs a decoder backbone (a causal LM with logits() and a KV cache, e.g. "
                        f"minipeft's Decoder); got {type(backbone).__name__}")
    return backbone


def check_options(max_new_tokens, do_sample, temperature, top_p, seed, stop_at_eos, use_cache, progress):
    if not isinstance(max_new_tokens, Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for key, value in (("do_sample", do_sample), ("stop_at_eos", stop_at_eos), ("use_cache", use_cache),
                       ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{key} must be True or False, got {value!r}")
    if not isinstance(temperature, Real) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (softmax(z/temperature); 1 leaves the model's "
                         f"distribution as it is), got {temperature!r}; for greedy decoding use do_sample=False")
    if not isinstance(top_p, Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (the probability mass of the nucleus; 1 keeps every token), "
                         f"got {top_p!r}")
    if seed is not None and (not isinstance(seed, Integral) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")


def tokenize(prompts, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt (strings need ``tokenizer``); every prompt non-empty, every id in the vocabulary."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of strings or of token-id lists (one prompt: "
                        f"[prompt]), got {'an empty ' if isinstance(prompts, (list, tuple)) else ''}"
                        f"{type(prompts).__name__}")
    prompts = [p.tolist() if isinstance(p, torch.Tensor) and p.dim() == 1 else p for p in prompts]
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise TypeError("string prompts need a tokenizer: generate(model, prompts, tokenizer) (e.g. "
                            "minipeft.backbones.decoder.load_decoder_tokenizer()), or pass token-id lists")
        ids = [list(t) for t in tokenizer(list(prompts))["input_ids"]]
    elif all(isinstance(p, (list, tuple)) and all(isinstance(t, Integral) for t in p) for p in prompts):
        ids = [[int(t) for t in p] for p in prompts]
    else:
        raise TypeError("prompts must be all strings or all lists of token ids, got "
                        f"{sorted({type(p).__name__ for p in prompts})}")
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty (0 tokens): every prompt needs at least one token to continue")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids in [{min(p)}, {max(p)}]; allowed: [0, {vocab_size - 1}]")
    return ids


def stop_tokens(eos_token_id, tokenizer, cfg) -> set[int]:
    """The token ids that end a continuation: ``eos_token_id`` (int or ints), else the tokenizer's, else the
    config's; none at all is allowed (then only the token limit stops)."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
        eos_token_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, Integral) else eos_token_id
    valid = isinstance(ids, (list, tuple, set)) and all(
        isinstance(t, Integral) and not isinstance(t, bool) and 0 <= t < cfg.vocab_size for t in ids)
    if not valid:
        raise ValueError(f"eos_token_id must be a token id or a list of them in [0, {cfg.vocab_size - 1}], "
                         f"got {eos_token_id!r}")
    return {int(t) for t in ids}


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask (1 = real), each prompt right-aligned: its last token in the last column."""
    T = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompt_ids):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[b, T - len(p):] = 1
    return ids, mask
