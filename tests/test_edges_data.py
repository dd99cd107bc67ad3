"""Task data and numbers that would poison training are refused before the model is touched (issue 25).

Task data given to ``train`` as a DatasetDict: a train row without a label (datasets' -1), a validation or test
split that cannot be scored (all -1, partly -1, empty), an empty train split, a missing split or column, labels
that are not class ids. Numbers: every float of the ``Budget`` (nan, ±inf, out of range), every integer (0, a
bool, a float), ``lr`` of ``train`` and ``train_lm`` (inf, nan, <= 0). Each refusal names the split or field
and what is allowed, and leaves the model exactly as it was (weights, ``requires_grad``, train/eval modes).
Real MiniLM and real sentiment snippets, cut to a few rows; the head alone trains.
"""
import copy
import dataclasses
import math

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Value

from minipeft.lab.tasks import check_task_data, load_task
from minipeft.lab.train import Budget, SequenceClassifier, seed_everything, train
from helpers import assert_unchanged, structure

BUDGET = Budget(max_train=16, max_eval=8, max_test=8, epochs=1, batch_size=8, max_length=16, timing_warmup_steps=0)


@pytest.fixture(scope="module")
def data():
    """16 / 8 / 8 real review snippets (ClassLabel rotten / fresh)."""
    return load_task("sentiment", max_train=16, max_eval=8, max_test=8)


@pytest.fixture(scope="module")
def head_model(minilm):
    """MiniLM (eval mode, frozen) + a fresh head (train mode): a mix of modes a refusal must keep. Shared: every
    test that uses it checks that it is left as it was."""
    seed_everything(0)
    model = SequenceClassifier(copy.deepcopy(minilm), num_labels=2)
    model.encoder.requires_grad_(False)
    return model


def refused(model, error, match, *args, **kwargs):
    """``train(model, *args, **kwargs)`` raises ``error`` matching ``match`` and leaves ``model`` as it was."""
    before = structure(model)
    with pytest.raises(error, match=match):
        train(model, *args, quiet=True, **kwargs)
    assert_unchanged(model, before)


def with_split(dd, split, ds):
    return DatasetDict({**dd, split: ds})


def relabel(ds, rows, label):
    """``ds`` with ``label`` in the given rows (datasets' map keeps the ClassLabel feature, which allows -1)."""
    return ds.map(lambda e, i: {"label": label if i in rows else e["label"]}, with_indices=True)


# ---- task data -----------------------------------------------------------------------------------------------

def test_a_train_row_without_label_is_refused_before_the_head_moves(head_model, data):
    # row 12 lands in the second batch: before, the first step had already updated the head when it crashed
    dd = with_split(data, "train", relabel(data["train"], {12}, -1))
    refused(head_model, ValueError, r"the train split has label -1 \(datasets' 'no label'\) in 1 of its 16 rows; "
            r"training needs a label on every row: drop them first", dd, 1e-3, BUDGET)


@pytest.mark.parametrize("split, rows, match", [
    ("test", range(8), r"all 8 rows of the test split have label -1 \(no label, as in GLUE's test splits\), so "
                       r"its accuracy cannot be measured"),
    ("validation", range(8), r"all 8 rows of the validation split have label -1"),
    ("test", {0, 5}, r"the test split has label -1 \(no label\) in 2 of its 8 rows, which would count as errors"),
])
def test_an_unlabelled_eval_split_is_refused_not_scored_zero(head_model, data, split, rows, match):
    refused(head_model, ValueError, match, with_split(data, split, relabel(data[split], set(rows), -1)), 1e-3, BUDGET)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_an_empty_split_is_refused_by_name(head_model, data, split):
    refused(head_model, ValueError, rf"the {split} split is empty; train\(\) needs at least one example in each of "
            r"\['train', 'validation', 'test'\]", with_split(data, split, data[split].select([])), 1e-3, BUDGET)


def test_plain_integer_labels_train_as_their_class_label_does(minilm, data):
    """Integer labels 0..C-1 without a ClassLabel (a hand-built dataset) are what a user means by C classes: they
    train exactly as the same labels with a ClassLabel do."""
    def run(dd):
        seed_everything(0)
        model = SequenceClassifier(copy.deepcopy(minilm), num_labels=2)
        model.encoder.requires_grad_(False)
        return train(model, dd, 1e-2, BUDGET, quiet=True)

    small = DatasetDict({split: ds.select(range(8)) for split, ds in data.items()})  # one step: the code path
    plain = small.cast_column("label", Value("int64"))
    assert isinstance(plain["train"].features["label"], Value) and check_task_data(plain) == 2  # largest + 1
    # a split train() does not read (IMDB's "unsupervised": all -1) is left out, not refused
    plain = with_split(plain, "unsupervised", relabel(plain["test"], set(range(8)), -1))
    named, integers = run(small), run(plain)
    assert named.steps == 1 and len(set(small["test"]["label"])) == 2
    assert integers.losses == named.losses and integers.val_acc == named.val_acc
    assert integers.test_predictions == named.test_predictions and integers.test_acc == named.test_acc


def test_integer_labels_that_do_not_fit_the_head_are_refused(head_model, data):
    plain = data.cast_column("label", Value("int64"))
    three = with_split(plain, "test", relabel(plain["test"], {3}, 2))  # a class 2: 3 classes, the head has 2
    refused(head_model, ValueError, r"task has 3 labels \(plain integer labels: the largest \+ 1; a ClassLabel "
            r"feature states the classes\) but the model's head has 2 outputs", three, 1e-3, BUDGET)
    negative = with_split(plain, "validation", relabel(plain["validation"], {6}, -2))
    refused(head_model, ValueError, r"the validation split has labels outside 0\.\.1 \(the task's 2 classes\) in 1 "
            r"of its 8 rows, e.g. -2 in row 6", negative, 1e-3, BUDGET)


@pytest.mark.parametrize("change, error, match", [
    (lambda dd: DatasetDict({"train": dd["train"], "test": dd["test"]}), ValueError,
     r"the task data has no validation split \(it has \['train', 'test'\]\); train\(\) needs "
     r"\['train', 'validation', 'test'\]"),
    (lambda dd: dd["train"], TypeError, r"task must be a task name \(sentiment, .*\) or a datasets.DatasetDict"),
    (lambda dd: dd.rename_column("text", "sentence"), ValueError,
     r"the train split has no 'text' column \(it has \['sentence', 'label'\]\)"),
    (lambda dd: dd.remove_columns("label"), ValueError, r"the train split has no 'label' column"),
    (lambda dd: dd.cast_column("label", Value("float32")), ValueError,
     r"the 'label' column of the train split must hold class ids \(a ClassLabel, or integers 0\.\.C-1\), "
     r"got Value\('float32'\)"),
    (lambda dd: dd.cast_column("label", Value("string")), ValueError,
     r"must hold class ids .* dd.class_encode_column\('label'\)"),
    (lambda dd: with_split(dd, "test", dd["test"].cast_column("label", ClassLabel(names=["neg", "pos"]))),
     ValueError, r"the splits name their classes differently: train \['rotten', 'fresh'\]; .* test \['neg', 'pos'\]"),
    (lambda dd: with_split(dd, "validation", Dataset.from_dict(
        {"text": ["fine", None], "label": [0, 1]}, features=dd["validation"].features)), ValueError,
     r"the validation split has a row without text \(None\): row 1"),
])
def test_malformed_task_data_is_refused(head_model, data, change, error, match):
    refused(head_model, error, match, change(data), 1e-3, BUDGET)


def test_load_task_sizes_are_whole_numbers():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"max_train must be a positive whole number of examples or None, "
                                             rf"got {bad!r}"):
            load_task("sentiment", max_train=bad)


# ---- numbers that poison training ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("grad_clip", math.nan, r"Budget.grad_clip must be a finite number > 0 \(the max global gradient norm\), got nan"),
    ("grad_clip", math.inf, r"Budget.grad_clip must be a finite number > 0"),
    ("grad_clip", 0.0, r"Budget.grad_clip must be a finite number > 0"),
    ("weight_decay", math.nan, r"Budget.weight_decay must be a finite number >= 0 \(AdamW's decoupled decay\), "
                               r"got nan"),
    ("weight_decay", math.inf, r"Budget.weight_decay must be a finite number >= 0"),
    ("weight_decay", -0.01, r"Budget.weight_decay must be a finite number >= 0"),
    ("warmup_ratio", math.nan, r"Budget.warmup_ratio must be in \[0, 1\) \(a fraction of the steps\), got nan"),
    ("warmup_ratio", 1.0, r"Budget.warmup_ratio must be in \[0, 1\)"),
    ("warmup_ratio", "0.1", r"Budget.warmup_ratio must be in \[0, 1\)"),
    ("epochs", 0, r"Budget.epochs must be a positive integer, got 0"),
    ("epochs", True, r"Budget.epochs must be a positive integer, got True"),
    ("batch_size", 0, r"Budget.batch_size must be a positive integer, got 0"),
    ("eval_batch_size", 8.0, r"Budget.eval_batch_size must be a positive integer, got 8.0"),
    ("max_train", 0, r"Budget.max_train must be a positive integer or None \(all\), got 0"),
    ("max_test", True, r"Budget.max_test must be a positive integer or None \(all\), got True"),
    ("timing_warmup_steps", 1.5, r"Budget.timing_warmup_steps must be an integer >= 0, got 1.5"),
    ("timing_warmup_steps", -1, r"Budget.timing_warmup_steps must be an integer >= 0, got -1"),
])
def test_budget_refuses_values_that_poison_or_break_training(field, value, match):
    with pytest.raises(ValueError, match=match):
        Budget(**{field: value})
    with pytest.raises(ValueError, match=match):  # a budget derived from a good one is checked too
        dataclasses.replace(Budget.fast(), **{field: value})


def test_budget_stays_as_checked():
    budget = Budget.fast()
    with pytest.raises(dataclasses.FrozenInstanceError):
        budget.grad_clip = math.nan
    assert budget.grad_clip == 1.0
    for good in (Budget.lesson(), Budget.generation(), Budget.generation_fast(), Budget(grad_clip=1e9, warmup_ratio=0,
                                                                                        weight_decay=0)):
        assert dataclasses.replace(good) == good  # the course's budgets and the edges of the ranges pass


@pytest.mark.parametrize("lr", [math.inf, -math.inf, math.nan, 0.0, -1e-3, "1e-3", True])
def test_train_refuses_a_learning_rate_that_is_not_finite_and_positive(head_model, lr):
    refused(head_model, ValueError, rf"lr must be a finite number > 0 \(AdamW's peak learning rate\), got {lr!r}",
            "sentiment", lr, BUDGET)


def test_train_refuses_a_budget_beyond_the_encoder_or_of_another_type(head_model):
    refused(head_model, ValueError, r"Budget.max_length 1000 exceeds the encoder's 512 positions; allowed: 1\.\.512",
            "sentiment", 1e-3, dataclasses.replace(BUDGET, max_length=1000))
    refused(head_model, TypeError, r"budget must be a minipeft.lab.train.Budget \(e.g. Budget.fast\(\)\), got dict",
            "sentiment", 1e-3, {"epochs": 1})


def test_train_lm_refuses_a_learning_rate_that_is_not_finite_and_positive():
    from minipeft.lab.generation_train import build_lm, train_lm

    model = build_lm("lora", seed=0)
    before = structure(model)
    for lr in (math.inf, math.nan, 0.0, None):
        with pytest.raises(ValueError, match=r"lr must be a finite number > 0 \(AdamW's peak learning rate\)"):
            train_lm(model, "headline", lr, Budget.generation_fast(), quiet=True)
    with pytest.raises(TypeError, match=r"budget must be a minipeft.lab.train.Budget"):
        train_lm(model, "headline", 1e-3, {"epochs": 1}, quiet=True)
    assert_unchanged(model, before)
