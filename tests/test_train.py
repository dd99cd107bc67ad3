"""The training loop, the classifier head, budgets, counting and the Result record (real MiniLM, real data)."""
import copy
import json

import pytest
import torch
from torch import nn

from minipeft.api import stored_count
from minipeft.lab.train import (Budget, Result, SequenceClassifier, backbone_parameter_count, count_parameters,
                            linear_warmup_decay, seed_everything, train,
                            training_state_bytes)
from helpers import TOL

TINY = Budget(max_train=32, max_eval=16, max_test=16, epochs=2, batch_size=16, max_length=16, timing_warmup_steps=1)


@pytest.fixture
def fresh(minilm):
    """A fresh copy of the pretrained encoder per call (cheaper than reading the checkpoint again)."""
    return lambda: copy.deepcopy(minilm)


def head_only(encoder, seed=0):
    seed_everything(seed)
    model = SequenceClassifier(encoder, num_labels=2)
    model.encoder.requires_grad_(False)
    return model


def test_mean_pooling_ignores_padding(minilm, tokenizer, sentences):
    torch.manual_seed(0)
    model = SequenceClassifier(minilm, 2).eval()
    batch = tokenizer(sentences[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(batch["input_ids"], batch["attention_mask"])
        for i, s in enumerate(sentences[:3]):
            alone = tokenizer([s], return_tensors="pt")
            assert torch.allclose(model(alone["input_ids"], alone["attention_mask"])[0], padded[i], atol=TOL)


def test_bad_arguments_are_explained(minilm, fresh):
    with pytest.raises(ValueError, match="pooling 'max' not supported; allowed"):
        SequenceClassifier(minilm, 2, pooling="max")
    with pytest.raises(ValueError, match="num_labels must be an integer >= 2"):
        SequenceClassifier(minilm, 1)
    with pytest.raises(ValueError, match="Budget.epochs must be a positive integer"):
        Budget(epochs=0)
    with pytest.raises(ValueError, match="warmup_ratio must be in"):
        Budget(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(SequenceClassifier(fresh(), 2).requires_grad_(False), "sentiment", 1e-3, TINY, quiet=True)


def test_wrong_number_of_labels_is_caught(fresh):
    model = head_only(fresh())
    with pytest.raises(ValueError, match="task has 5 labels but the model's head has 2 outputs"):
        train(model, "topic", 1e-3, TINY, quiet=True)


def test_budget_from_env(monkeypatch):
    monkeypatch.setenv("MINIPEFT_FAST", "1")
    assert Budget.from_env() == Budget.fast()
    monkeypatch.setenv("MINIPEFT_FAST", "0")
    assert Budget.from_env() == Budget.lesson()
    fast, lesson = Budget.fast(), Budget.lesson()
    assert fast.epochs == lesson.epochs and fast.max_train < lesson.max_train  # shrinks data, keeps the code path


def test_schedule_warms_up_then_decays_to_zero():
    f = linear_warmup_decay(warmup=4, total=10)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(7) == pytest.approx(0.5) and f(10) == 0.0


def test_head_only_training_is_seeded_and_touches_only_the_head(fresh):
    model = head_only(fresh(), seed=0)
    frozen_before = model.encoder.layers[0].attn.q.weight.clone()
    head_before = model.head.weight.clone()
    a = train(model, "sentiment", 3e-3, TINY, seed=0, method="head", quiet=True)
    assert torch.equal(model.encoder.layers[0].attn.q.weight, frozen_before)
    assert not torch.equal(model.head.weight, head_before)
    b = train(head_only(fresh(), seed=0), "sentiment", 3e-3, TINY, seed=0, method="head", quiet=True)
    c = train(head_only(fresh(), seed=1), "sentiment", 3e-3, TINY, seed=1, method="head", quiet=True)
    assert a.losses == b.losses and a.val_acc == b.val_acc and a.test_acc == b.test_acc
    assert a.losses != c.losses
    assert a.steps == 4 and len(a.val_acc) == 2 and 0.0 <= a.test_acc <= 1.0
    assert a.trainable_params == a.stored_params == 384 * 2 + 2
    assert a.backbone_params == 22_565_376 and a.total_params == 22_565_376 + 770
    assert a.trainable_pct == pytest.approx(100 * 770 / 22_565_376)
    assert a.sec_per_step > 0 and a.peak_memory_mb >= 0 and a.memory_measure
    assert a.train_state_mb == pytest.approx(4 * (a.total_params + 3 * 770) / 2**20)
    # JSON round trip
    again = Result.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again == a
    with pytest.raises(ValueError, match="missing fields"):
        Result.from_dict({"task": "sentiment"})


def test_full_fine_tuning_changes_the_encoder(fresh):
    seed_everything(0)
    model = SequenceClassifier(fresh(), 2)
    before = model.encoder.layers[3].ffn.ffn_in.weight.clone()
    r = train(model, "sentiment", 1e-4, Budget(max_train=16, max_eval=8, max_test=8, epochs=1, batch_size=16, max_length=16),
              method="full", quiet=True)
    assert not torch.equal(model.encoder.layers[3].ffn.ffn_in.weight, before)
    assert r.trainable_params == r.total_params == 22_565_376 + 770


class Ejectable(nn.Module):
    """A module that trains 100 parameters but stores only 10 (like a prefix after dropping its MLP)."""

    def __init__(self):
        super().__init__()
        self.big = nn.Parameter(torch.zeros(100))

    def stored_parameter_count(self):
        return 10


def test_counting_and_the_stored_parameter_hook(bert_base_sized):
    model = nn.Sequential(nn.Linear(4, 3), Ejectable())
    assert count_parameters(model, trainable_only=True) == 115
    assert stored_count(model) == 15 + 10
    model[0].requires_grad_(False)
    assert stored_count(model) == 10
    shared = nn.Parameter(torch.zeros(7))
    a, b = Ejectable(), Ejectable()
    a.shared = b.shared = shared
    a.stored_parameter_count = b.stored_parameter_count = lambda: 10 + 7
    assert stored_count(nn.Sequential(a, b)) == 10 + 10 + 7  # the shared tensor once
    assert stored_count([a, b]) == 10 + 10 + 7  # a list of adapter modules (parameter_summary) the same
    assert backbone_parameter_count(bert_base_sized) == 108_891_648  # BERT-base without its pooler
    assert training_state_bytes(10, 4) == 4 * (10 + 12)
    with pytest.raises(ValueError, match="trainable_params <= total_params"):
        training_state_bytes(10, 11)
