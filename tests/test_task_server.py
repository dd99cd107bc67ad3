"""Serving several tasks on one MiniLM (``minipeft.lab.serving``): a batch mixing tasks gives each example its own
task's adapter and head, equal to that task's model alone; the committed task adapters (results/serving) reproduce
their recorded test predictions when served together."""
import pytest
import torch
from torch import nn

from minipeft import LoRAConfig, add_adapter, set_active
from minipeft.lab.serving import SERVING_DIR, TASKS, TaskServer, load_server
from minipeft.lab.tasks import load_task
from minipeft.lab.train import SequenceClassifier
from helpers import perturb, structure, assert_unchanged


def test_each_example_gets_its_tasks_adapter_and_head(minilm, tokenizer):
    torch.manual_seed(0)
    heads = {"a": nn.Linear(384, 2), "b": nn.Linear(384, 4)}
    for name in heads:
        add_adapter(minilm, LoRAConfig(r=4), name)
    perturb(minilm)
    server = TaskServer(minilm, heads).eval()
    batch = tokenizer(["a fine film", "the market fell sharply today", "what is the capital of France?",
                       "dull"], padding=True, return_tensors="pt")
    tasks = ["a", "b", "b", "a"]
    before = structure(server)
    with torch.no_grad():
        mixed = server(batch["input_ids"], batch["attention_mask"], tasks)
    assert_unchanged(server, before)
    for task, head in heads.items():
        alone = SequenceClassifier(minilm, head.out_features).eval()
        alone.head = head
        set_active(minilm, task)
        with torch.no_grad():
            logits = alone(batch["input_ids"], batch["attention_mask"])
        for i in (i for i, t in enumerate(tasks) if t == task):
            assert mixed[i].shape == (head.out_features,)
            assert float((mixed[i] - logits[i]).abs().max()) < 1e-5
    with pytest.raises(KeyError, match="no head for task 'c'; this server holds \\['a', 'b'\\]"):
        server(batch["input_ids"], batch["attention_mask"], ["a", "c", "a", "b"])


@pytest.mark.skipif(not (SERVING_DIR / TASKS[-1] / "scores.json").exists(), reason="results/serving not made yet")
def test_the_committed_task_adapters_served_together_reproduce_their_predictions(tokenizer):
    """8 test examples of each task, interleaved in one batch: the answers recorded when each adapter was trained
    and evaluated alone (an argmax: fp32 rounding on another CPU moves logits by ~1e-6, far below a margin)."""
    import json

    server = load_server()
    texts, tasks, expected = [], [], []
    for task in TASKS:
        recorded = json.loads((SERVING_DIR / task / "scores.json").read_text())["test_predictions"][:8]
        texts += list(load_task(task, max_test=8)["test"]["text"])
        tasks += [task] * 8
        expected += recorded
    order = [i for j in range(8) for i in range(j, len(texts), 8)]  # interleave the tasks
    batch = tokenizer([texts[i] for i in order], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = server(batch["input_ids"], batch["attention_mask"], [tasks[i] for i in order])
    assert [int(z.argmax()) for z in logits] == [expected[i] for i in order]
