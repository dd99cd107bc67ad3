"""The comparison harness: registry, CLI, and the three result files (fast budget, into a tmp dir)."""
import json

import pytest

from minipeft.core import RECIPES, Recipe, get_recipe, register_recipe
from minipeft.lab import compare
from minipeft.lab.cli import main as cli
from minipeft.lab.compare import build_model, load_results


def test_registry_has_the_baselines_and_explains_mistakes():
    assert {"full", "head"} <= set(RECIPES)
    with pytest.raises(ValueError, match="unknown method 'no_such_method'; registered methods: .*full.*head"):
        get_recipe("no_such_method")
    with pytest.raises(ValueError, match="already registered"):
        register_recipe(RECIPES["head"])
    with pytest.raises(ValueError, match="lr of 'x' must be > 0"):
        Recipe("x", lesson="00", lr=0, prepare=lambda m: None)
    with pytest.raises(ValueError, match="method name must be"):
        Recipe("a b", lesson="00", lr=1e-3, prepare=lambda m: None)


def test_build_model_prepares_the_method():
    model = build_model("head", "topic", seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"} and model.num_labels == 5
    with pytest.raises(ValueError, match="unknown task"):
        build_model("head", "spam")


def test_cli_writes_the_three_files_per_task(tmp_path, capsys, monkeypatch):
    cli(["compare", "--fast", "--tasks", "topic", "question", "--methods", "full", "head", "--seeds", "0", "1",
         "--out", str(tmp_path), "--quiet"])
    data = json.loads((tmp_path / "question" / "comparison.json").read_text())
    assert data["command"] == (f"python -m minipeft compare --fast --tasks topic question --methods full head "
                               f"--seeds 0 1 --out {tmp_path} --quiet")
    assert [(r["method"], r["seed"]) for r in data["results"]] == [("full", 0), ("full", 1), ("head", 0), ("head", 1)]
    assert data["budget"]["max_train"] == 64 and len(data["test_labels"]) == 32 == len(data["results"][0]["test_predictions"])
    assert len(data["machine"]["load_average"]["start"]) == 3 and data["machine"]["cores"] >= 1
    assert len(load_results(tmp_path / "topic" / "comparison.json")) == 4
    md = (tmp_path / "question" / "comparison.md").read_text()
    assert "| head | 00 | 0.003 | 2,310 |" in md and "±" in md and "Command: `python -m minipeft compare" in md
    assert "p=" in md.split("| head |")[1] and "| 100.0 | — |" in md  # head paired against full; full is the reference
    assert (tmp_path / "topic" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    cli(["report", "--results", str(tmp_path)])  # both tasks in one table, no costs yet: it says how to make them
    table = (tmp_path / "table.md").read_text()
    assert "question: acc" in table and "topic: acc" in table and "costs.py --out" in table
    with pytest.raises(SystemExit):
        compare.main(["--methods", "nope", "--out", str(tmp_path)])
    assert "unknown method(s) ['nope']; registered methods:" in capsys.readouterr().err

    # --add: new runs join the record (a (method, seed) run again replaces its old run); another budget is refused
    cli(["compare", "--fast", "--tasks", "topic", "--methods", "head", "lora", "--seeds", "1", "--out", str(tmp_path),
         "--quiet", "--add"])
    data = json.loads((tmp_path / "topic" / "comparison.json").read_text())
    assert [(r["method"], r["seed"]) for r in data["results"]] == [("full", 0), ("full", 1), ("head", 0),
                                                                   ("head", 1), ("lora", 1)]
    assert data["command"].endswith("--seeds 0 1 --out " + str(tmp_path) + " --quiet")
    assert [a["command"].split()[-1] for a in data["added"]] == ["--add"]
    assert "Added by: `python -m minipeft compare --fast" in (tmp_path / "topic" / "comparison.md").read_text()
    before = (tmp_path / "topic" / "comparison.json").read_bytes()
    monkeypatch.delenv("MINIPEFT_FAST", raising=False)  # the lesson budget, not the record's fast one
    with pytest.raises(SystemExit, match="runs with another budget cannot be added"):
        compare.main(["--tasks", "topic", "--methods", "head", "--out", str(tmp_path), "--add"])
    assert (tmp_path / "topic" / "comparison.json").read_bytes() == before

    # a lesson reads recorded runs made with its budget, and trains (seed 0) what is not recorded
    from minipeft.lab.train import Budget
    runs = compare.recorded_runs(("full", "lora"), "topic", Budget.fast(), tmp_path)
    assert [r.seed for r in runs["full"]] == [0, 1] and runs["full"][1].losses == data["results"][1]["losses"]
    assert [r.seed for r in runs["lora"]] == [1]
    runs = compare.recorded_runs(("head",), "question", Budget.fast(), tmp_path / "elsewhere")
    assert [r.seed for r in runs["head"]] == [0] and "trained here, seed 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["train"])


def test_one_builder_gives_the_same_numbers_whatever_ran_before():
    """A lesson builds its models in its own order; compare runs them in lesson order. Through ``build_model``
    (which seeds before building) the same method, task and seed give the same run either way."""
    from minipeft.lab.compare import run_comparison
    from minipeft.lab.train import Budget, train

    budget = Budget.fast()
    harness = {r.method: r for r in run_comparison(["lora", "prefix"], "topic", [1], budget, quiet=True)}
    build_model("houlsby", "topic", seed=3)  # a lesson built (and seeded) something else first
    for name in ("prefix", "lora"):           # ... and runs them in another order
        spec = get_recipe(name)
        lesson = train(build_model(spec, "topic", seed=1), "topic", spec.lr, budget, seed=1, quiet=True)
        assert lesson.losses == harness[name].losses and lesson.test_predictions == harness[name].test_predictions
