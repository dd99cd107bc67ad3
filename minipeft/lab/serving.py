"""Serving several tasks on one frozen MiniLM: a LoRA adapter and a head per task, and batches that mix tasks.

Each task's adapter is trained as the course trains LoRA (``compare``'s recipe, the lesson budget) and saved with
its head under ``results/serving/<task>/`` (kept and reused when there). ``TaskServer`` holds the one backbone,
every task's adapter (named after its task) and every head: a batch of examples from different tasks goes through
the backbone once, each example with its own task's adapter (``per_example``), then through its own task's head.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..api import load_adapter
from ..backbones.contract import per_example
from ..backbones.encoder import Encoder
from .compare import HEAD_FILE, trained_adapters
from .train import Budget

SERVING_DIR = Path(__file__).resolve().parents[2] / "results" / "serving"  # committed with the course
TASKS = ("sentiment", "topic", "question", "subjectivity")
RECIPE = "lora"


def train_task_adapters(directory=SERVING_DIR, tasks=TASKS, budget: Budget | None = None, seed: int = 0,
                        quiet: bool = True) -> dict[str, dict]:
    """LoRA + head per task, saved to ``directory/<task>/`` (a task saved there is read, not retrained). Returns
    {task: {"test_acc", "val_acc", "test_predictions", ...}}: each adapter on its own task, alone."""
    return trained_adapters(directory, RECIPE, tasks, budget, seed, quiet)


class TaskServer(nn.Module):
    """One frozen backbone, one adapter and one head per task (``heads[task]``); ``forward(ids, mask, tasks)``
    gives each example its own task's logits (a list: tasks have different numbers of classes)."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Linear]):
        super().__init__()
        self.encoder, self.heads = encoder, nn.ModuleDict(heads)

    def forward(self, input_ids, attention_mask, tasks: list[str]) -> list[torch.Tensor]:
        unknown = sorted(set(tasks) - set(self.heads))
        if unknown:
            raise KeyError(f"no head for task {unknown[0]!r}; this server holds {sorted(self.heads)}")
        with per_example(self.encoder, tasks):
            hidden = self.encoder(input_ids, attention_mask)  # (B, T, d): example i through adapter tasks[i]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d): SequenceClassifier's mean pooling
        return [self.heads[task](pooled[i]) for i, task in enumerate(tasks)]


def load_server(directory=SERVING_DIR, tasks=TASKS, encoder: nn.Module | None = None) -> TaskServer:
    """MiniLM with every task's adapter (named after its task) and head, read from ``directory/<task>/``."""
    encoder = (encoder or Encoder.from_pretrained()).eval()
    heads = {}
    for task in tasks:
        load_adapter(encoder, Path(directory) / task, name=task)
        state = load_file(str(Path(directory) / task / HEAD_FILE))
        heads[task] = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        heads[task].load_state_dict(state)
    return TaskServer(encoder, heads).eval()
