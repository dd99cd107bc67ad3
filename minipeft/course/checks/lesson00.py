"""Lesson 00 checks: counting parameters, the encoder's closed-form size, the memory of training.

References: ``minipeft.lab.train.count_parameters``, ``Encoder`` built on the meta device (``numel``),
``minipeft.lab.train.training_state_bytes``.
"""
from __future__ import annotations

import torch
from torch import nn

from ...backbones.encoder import Encoder, EncoderConfig
from ...lab.train import count_parameters, training_state_bytes
from . import call, explain, fail, need_int, passed

MINILM = EncoderConfig.minilm()
BERT_BASE = EncoderConfig(name="BERT-base")
TINY = EncoderConfig(vocab_size=100, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=40,
                     max_position=24, type_vocab_size=1, name="tiny")


class _Tied(nn.Module):
    """An embedding and an output layer sharing one weight (like a language-model head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10)
        self.out.weight = self.embed.weight


def _modules():
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    frozen[0].requires_grad_(False)
    encoder = Encoder(TINY)
    encoder.embed.requires_grad_(False)
    return {"Linear(3, 4)": nn.Linear(3, 4), "Linear(5,6) frozen + BatchNorm1d(6) + Linear(6,2)": frozen,
            "tied embedding/output": _Tied(), "tiny Encoder, embeddings frozen": encoder}


def check_count_parameters(fn) -> None:
    """``fn(module, trainable_only=False) -> int``: parameter elements; shared tensors once; no buffers."""
    name = "count_parameters"
    for label, m in _modules().items():
        for trainable_only in (False, True):
            got = call(name, fn, m, trainable_only=trainable_only)
            want = count_parameters(m, trainable_only)
            if isinstance(got, torch.Tensor) and got.numel() == 1:
                got = got.item()
            need_int(name, got, f"for {label} (trainable_only={trainable_only})")
            if got == want:
                continue
            tensors = sum(1 for p in m.parameters() if p.requires_grad or not trainable_only)
            hint = {tensors: "that is the number of parameter *tensors*: add up p.numel() instead.",
                    count_parameters(m): "that counts frozen parameters too: with trainable_only=True keep only "
                                         "those with p.requires_grad.",
                    sum(t.numel() for t in m.state_dict().values()): "that includes buffers (BatchNorm's running "
                    "statistics) or counts a shared weight twice: iterate over module.parameters(), not "
                    "state_dict()."}.get(got, "add up the number of elements of every tensor that "
                                          "module.parameters() yields (each shared tensor once).")
            fail(name, f"returned {got:,} for {label} (trainable_only={trainable_only}), expected {want:,}: {hint}")
    passed(name, f"correct on {len(_modules())} modules (frozen parts, a buffer, a tied weight), both modes")


def encoder_terms(c: EncoderConfig) -> dict[str, int]:
    """The formula's parts (they add up to it), to name the one a wrong answer is missing (Devlin et al. 2019)."""
    d, f, L = c.hidden_size, c.intermediate_size, c.num_layers
    return {"the position embeddings (max_position·d)": c.max_position * d,
            "the token-type embeddings (type_vocab_size·d)": c.type_vocab_size * d,
            "the word embeddings (vocab_size·d)": c.vocab_size * d,
            "the LayerNorms' gains and biases (2d each: 1 after the embeddings + 2 per layer)": 2 * d * (1 + 2 * L),
            "the biases of the linear layers (L·(4d + f + d))": L * (4 * d + f + d),
            "the attention's four d×d projections (L·4d²)": L * 4 * d * d,
            "the FFN's two matrices (L·2df)": L * 2 * d * f}


def check_encoder_formula(fn) -> None:
    """``fn(cfg: EncoderConfig) -> int``: the encoder's parameter count in closed form."""
    name = "encoder_parameters"
    for cfg in (TINY, MINILM, BERT_BASE):
        with torch.device("meta"):
            want = count_parameters(Encoder(cfg))
        got = call(name, fn, cfg)
        need_int(name, got, f"for {cfg.name}")
        if got != want:
            d = cfg.hidden_size
            shape = (f"V={cfg.vocab_size}, P={cfg.max_position}, T={cfg.type_vocab_size}, d={d}, "
                     f"L={cfg.num_layers}, f={cfg.intermediate_size}")
            hint = (f" The difference (+{d * d + d:,}) is exactly a pooler (d² + d): minipeft's Encoder has no "
                    "pooler (the classifier pools itself), so it is not part of the count."
                    if got - want == d * d + d else
                    explain(got, want, {**encoder_terms(cfg), "the embeddings' LayerNorm (2d)": 2 * d}))
            fail(name, f"gave {got:,} for {cfg.name} ({shape}); numel says {want:,}.{hint}")
    passed(name, "the formula matches numel for a tiny encoder, MiniLM-L6 (22,565,376) and BERT-base (108,891,648)")


def check_training_memory(fn) -> None:
    """``fn(total_params, trainable_params, bytes_per_value=4) -> int``: weights + grads + AdamW m and v, bytes."""
    name = "training_memory_bytes"
    cases = [(22_566_146, 770, 4), (5000, 1000, 2), (22_566_146, 22_566_146, 4), (1000, 0, 4)]  # distinct hints first
    for n, t, b in cases:
        got = call(name, fn, n, t, bytes_per_value=b)
        need_int(name, got, f"for total={n:,}, trainable={t:,}, bytes_per_value={b}")
        want = training_state_bytes(n, t, b)
        if got == want:
            continue
        hint = {b * (n + 2 * t): "each trainable parameter needs a gradient *and* AdamW's two moments (m, v): "
                                 "3 extra values, you have 2.",
                b * (n + t): "AdamW keeps two moment estimates (m and v) per trainable parameter.",
                b * 4 * n: "frozen parameters have no gradient and no optimiser state: only trainable ones do.",
                4 * (n + 3 * t): "use bytes_per_value (2 for fp16/bf16), not a fixed 4.",
                n + 3 * t: "that is a number of values; multiply by bytes_per_value to get bytes.",
                b * 3 * t: "the weights themselves (all of them, frozen too) must be in memory as well."}
        fail(name, f"gave {got!r} for total={n:,}, trainable={t:,}, bytes_per_value={b}; expected {want:,}. "
             + hint.get(got, "every weight is held once; each trainable one also has a gradient and AdamW's m "
                             "and v; each value takes bytes_per_value bytes."))
    passed(name, f"correct on {len(cases)} cases (full FT, head only, nothing trained, 2-byte values)")


# ---- a derivation: how many trainable parameters does a memory budget allow? --------------------------------

MAX_TRAINABLE_CASES = ((22_565_376, 1.1), (1_000, 2.0), (109_482_240, 1.5), (10, 1.0), (7, 1.25))


def _fits(total: int, trainable: int, ratio: float) -> bool:
    """weights + gradients + AdamW (4 bytes each) <= ratio × the weights alone; exact (fractions, no rounding)."""
    from fractions import Fraction

    return 4 * (total + 3 * trainable) <= Fraction(ratio) * 4 * total


def reference_max_trainable(total: int, ratio: float) -> int:
    """The largest n with 4(N + 3n) <= ratio · 4N, i.e. floor((ratio - 1)·N / 3), computed exactly."""
    from fractions import Fraction

    return max(0, int((Fraction(ratio) - 1) * total // 3))


def check_max_trainable(fn) -> None:
    """``fn(total_params, ratio) -> int``: the most parameters one may train so that weights + gradients + AdamW
    state stay within ``ratio`` times the memory of the weights alone (fp32, activations excluded)."""
    name = "max_trainable"
    for total, ratio in MAX_TRAINABLE_CASES:
        got = call(name, fn, total, ratio, hint="total_params is an int, ratio a float >= 1.")
        need_int(name, got, f"for total_params={total:,}, ratio={ratio}")
        want = reference_max_trainable(total, ratio)
        if got == want:
            continue
        where = f"for total_params={total:,} and ratio={ratio}: gave {got:,}, expected {want:,}."
        mistakes = {
            int((ratio - 1) * total // 4): " Each trainable weight adds three values (its gradient, m and v): its "
            "own value is already among the weights.",
            int((ratio - 1) * total // 2): " AdamW keeps two moments (m and v) per trainable weight, and the gradient "
            "comes on top: three extra values, not two.",
            int(ratio * total // 3): " The budget ratio × weights already includes the frozen and trainable weights "
            "themselves: only what is left over pays for gradients and moments.",
        }
        hint = mistakes.get(got, "")
        if not hint and got > want:
            hint = (" That many does not fit: weights + gradients + AdamW would exceed the budget. Round down, not "
                    "to the nearest.") if not _fits(total, got, ratio) else ""
        elif not hint and got < want:
            hint = f" {got + 1:,} trainable parameters still fit: find the largest count that does."
        fail(name, where + (hint or " Write the memory as a function of the trainable count n, set it equal to "
                                    "the budget, solve for n, and round to a whole number that still fits."))
    passed(name, "the largest trainable count within the budget, on MiniLM, BERT-base and three small cases")
