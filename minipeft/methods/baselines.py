"""The two baselines every method is measured against (lesson 00): no adapter at all.

    full   full fine-tuning: every backbone parameter and the head train (Devlin et al. 2019, §4)
    head   a linear probe: the backbone is frozen, only the task head trains
"""
from __future__ import annotations

from torch import nn

from ..core import Recipe, register_recipe


def _prepare_full(model: nn.Module) -> None:
    """Full fine-tuning: every parameter trains."""
    model.requires_grad_(True)


def _prepare_head(model: nn.Module) -> None:
    """Head only (a linear probe): the backbone is frozen, only the classification head trains."""
    model.requires_grad_(False)
    model.head.requires_grad_(True)


register_recipe(Recipe("full", lesson="00", lr=1e-4, prepare=_prepare_full,
                       description="full fine-tuning: all backbone parameters + head"))
register_recipe(Recipe("head", lesson="00", lr=3e-3, prepare=_prepare_head,
                       description="head only: frozen backbone, linear head on mean-pooled states"))
