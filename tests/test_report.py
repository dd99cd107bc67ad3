"""Reading results: per-method mean and interval, % of full fine-tuning, the paired verdict, the design table."""
import math

import pytest

from minipeft.lab.report import design_markdown, markdown_table, summarise
from minipeft.lab.train import Result

LABELS = [i % 2 for i in range(200)]


def run(method, seed, n_wrong, acc_shift=0):
    """A record of one run whose first ``n_wrong`` test predictions are wrong."""
    preds = [1 - y if i < n_wrong else y for i, y in enumerate(LABELS)]
    return Result(task="t", method=method, config={}, seed=seed, lr=1e-3, budget={}, val_acc=[0.5],
                  test_acc=1 - n_wrong / len(LABELS), losses=[1.0], steps=1, sec_per_step=0.1, train_seconds=1.0,
                  peak_memory_mb=10.0, memory_measure="", train_state_mb=5.0, trainable_params=10,
                  stored_params=10, total_params=100, backbone_params=90, trainable_pct=11.1, stored_pct=11.1,
                  device="cpu", test_predictions=preds)


def test_a_clear_loss_is_worse_and_a_tie_within_noise():
    results = [run("full", s, 10) for s in range(3)] + [run("head", s, 60 + s) for s in range(3)] \
        + [run("lora", s, 10 + s) for s in range(3)]
    rows = {r["method"]: r for r in summarise(results, LABELS)}
    assert rows["full"]["vs_full"] is None and rows["full"]["pct_of_full"] == pytest.approx(100)
    assert rows["head"]["vs_full"].verdict == "worse" and rows["head"]["pct_of_full"] < 75
    assert rows["lora"]["vs_full"].verdict == "within noise"
    assert rows["head"]["test_acc"] == pytest.approx(1 - 61 / 200) and rows["head"]["half_width"] > 0
    table = markdown_table(results, LABELS)
    assert "| head |" in table and ": worse |" in table and ": within noise |" in table


def test_one_seed_has_no_interval_and_no_labels_no_paired_test():
    rows = summarise([run("full", 0, 10), run("lora", 0, 12)])
    assert math.isnan(rows[1]["half_width"]) and rows[1]["vs_full"] is None
    text = design_markdown({"t": {"results": [run("full", 0, 10), run("lora", 0, 12)], "test_labels": LABELS}})
    assert "reference" in text and "within noise" in text
