"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): l trainable
soft tokens in front of the embedded input, nothing else.

    input  X = (x_1 .. x_n)  →  X_e ∈ R^{n×d}  (the frozen word embeddings)
    model reads [P; X_e] ∈ R^{(l+n)×d},   P ∈ R^{l×d} trained                     Lester et al. 2021, §2

Every layer then computes keys and values for the l soft positions from P itself, so prompt tuning is prefix
tuning (Li & Liang 2021) whose trained vectors live at layer 0's input only: the deeper layers' "prefix" keys and
values are functions of P, not free parameters (He et al. 2022, §3 place both in the same view).

Positions: the soft tokens are tokens of the sequence (they pass through every block), so they take positions
0..l-1 and the real tokens l..l+n-1, what a textual prompt of l words would give them; the backbone returns the
n real tokens' hidden states only (``Backbone.prepend_prompts``), so heads, pooling and generation are unchanged.
peft's ``PromptTuningConfig`` does the same (its virtual tokens first).

Parameters: l·d trained and stored (SmolLM2-135M, l=20: 11,520; MiniLM, l=20: 7,680). Initialisation (§3.2,
Fig. 3b): "vocab" copies the frozen embeddings of l token ids (default: l ids drawn from the 5,000 first ids, the
paper's "sampled vocab"), "random" draws P ~ U(−0.5, 0.5) (the paper's random uniform).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core import (AdapterConfig, AdapterModule, Example, Knob, Recipe, find_backbone, register_example,
                    register_method, register_recipe)

INITS = ("vocab", "random")
SAMPLED_VOCAB = 5000  # Lester et al. 2021, §3.2: "sampled vocab" draws from the 5,000 most common tokens


@register_method
@dataclass
class PromptTuningConfig(AdapterConfig):
    """``length`` l soft tokens; ``init`` "vocab" (the embeddings of ``init_tokens``, l token ids; default: drawn
    from the first 5,000 ids) or "random" (U(−0.5, 0.5))."""

    method = "prompt_tuning"
    length: int = 20
    init: str = "vocab"
    init_tokens: list[int] | None = None

    def __post_init__(self):
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length <= 0:
            raise ValueError(f"prompt tuning length (the number of soft tokens l) must be a positive integer, "
                             f"got {self.length!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown prompt tuning init {self.init!r}; allowed: {INITS}")
        if self.init_tokens is not None:
            tokens = list(self.init_tokens)
            if self.init != "vocab" or len(tokens) != self.length or \
                    not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise ValueError(f"init_tokens needs init='vocab' and exactly length={self.length} integer token ids, "
                                 f"got {self.init_tokens!r} with init={self.init!r}")
            self.init_tokens = tokens

    def attach(self, model: nn.Module, name: str) -> None:
        backbone = find_backbone(model)
        backbone.prompts[name] = SoftPrompt(name, backbone, self)


class SoftPrompt(AdapterModule):
    """P (l, d): ``weight``; ``forward()`` returns it for ``Backbone.prepend_prompts``."""

    def __init__(self, adapter_name: str, backbone, config: PromptTuningConfig):
        super().__init__(adapter_name)
        self.length = config.length
        words = input_embedding(backbone)  # (V, d), frozen
        self.weight = nn.Parameter(torch.empty(config.length, words.shape[1], device=words.device, dtype=words.dtype))
        if words.is_meta:  # shapes only (counting on the meta device): nothing to initialise from
            return
        with torch.no_grad():
            if config.init == "random":
                nn.init.uniform_(self.weight, -0.5, 0.5)  # Lester et al. 2021, §3.2 "random uniform"
            else:
                ids = config.init_tokens
                if ids is None:
                    ids = torch.randperm(min(SAMPLED_VOCAB, words.shape[0]), device="cpu")[:config.length].tolist()
                if len(ids) > words.shape[0] or min(ids) < 0 or max(ids) >= words.shape[0]:
                    raise ValueError(f"init_tokens must be token ids in [0, {words.shape[0] - 1}] (and l ≤ the "
                                     f"vocabulary); got {min(ids)}..{max(ids)} for l={config.length}")
                self.weight.copy_(words[torch.tensor(ids, device=words.device)])  # "sampled vocab" / class labels

    def forward(self) -> torch.Tensor:
        return self.weight  # (l, d)

    def extra_repr(self) -> str:
        return f"l={self.length}, d={self.weight.shape[1]}"


def input_embedding(backbone) -> torch.Tensor:
    """The backbone's word-embedding matrix (V, d): the ``nn.Embedding`` that reads the token ids."""
    embed = backbone.embed
    table = embed if isinstance(embed, nn.Embedding) else getattr(embed, "word", None)
    if not isinstance(table, nn.Embedding):
        raise TypeError(f"prompt tuning needs the word embedding of this {backbone.description} (backbone.embed "
                        "or backbone.embed.word, an nn.Embedding)")
    return table.weight.detach()


def prompt_tuning_count(d: int, l: int) -> int:
    """l·d: the soft tokens P ∈ R^{l×d}, trained and stored (Lester et al. 2021, §2)."""
    return l * d


# lr: chosen on question's validation split among 3e-3, 3e-2, 3e-1 (bench/classification_lr_probe.py,
# results/lesson10/lr_probe.txt)
register_recipe(Recipe.adapter(
    "prompt_tuning", lesson="10", lr=3e-2, make=lambda l: PromptTuningConfig(length=l),
    knob=Knob("soft tokens l", (1, 5, 10, 20, 50, 100), 20), order=3,
    description="prompt tuning l=20 (Lester et al. 2021): soft tokens at the input only, init from sampled vocab; "
                "l·d"))

# the conformance suite's examples (tests/test_conformance.py: every method on every backbone)
register_example("prompt_tuning", "vocab", Example(lambda: PromptTuningConfig(length=3),
                                                   lambda d, L, w: prompt_tuning_count(d, 3)))
register_example("prompt_tuning", "random", Example(lambda: PromptTuningConfig(length=2, init="random"),
                                                    lambda d, L, w: prompt_tuning_count(d, 2)))
