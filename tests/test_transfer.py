"""AdapterFusion's two stages (minipeft.lab.transfer) on the real MiniLM and the real tasks, CI's budget."""
import json
from dataclasses import asdict

import pytest

from minipeft.lab.compare import build_model
from minipeft.lab.compare import main as compare_main
from minipeft.core import RECIPES, adapter_modules, adapter_names
from minipeft.methods.fusion import fusion_count
from minipeft.lab.train import Budget, count_parameters
from minipeft.lab.transfer import (ARMS, FUSION_LR, FUSION_LRS, SOURCES, SOURCES_DIR, TARGET, build_arm,
                               fusion_against_controls, load_sources, main, target_budget, train_sources)

RECORD = SOURCES_DIR.parent / "transfer.json"  # the committed study lesson 07 reads


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Stage 1 at CI's budget: a Pfeiffer adapter per source task, saved."""
    directory = tmp_path_factory.mktemp("sources")
    return directory, train_sources(directory, budget=Budget.fast())


def test_stage_one_saves_every_source_and_reads_it_back(sources):
    directory, scores = sources
    assert set(scores) == set(SOURCES) and all(0 <= s["test_acc"] <= 1 for s in scores.values())
    saved = (directory / "sentiment" / "minipeft_adapter.safetensors").stat().st_mtime_ns
    assert train_sources(directory, budget=Budget.fast()) == scores  # read, not retrained
    assert (directory / "sentiment" / "minipeft_adapter.safetensors").stat().st_mtime_ns == saved
    model = build_model("head", TARGET)
    assert load_sources(model, directory, ("sentiment",)) == ["sentiment"]
    assert not any(p.requires_grad for m in adapter_modules(model, "sentiment").values() for p in m.parameters())


def test_every_arm_trains_what_it_says(sources):
    directory, _ = sources
    sizes = {}
    for arm in ARMS:
        model, lr = build_arm(arm, 0, best="sentiment", directory=directory)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("head.") or "deltas" in n for n in trainable), arm
        sizes[arm] = count_parameters(model, trainable_only=True)
    head = sizes["head"]
    assert sizes["source_frozen"] == head and sizes["fusion"] == head + fusion_count(384, 6)
    assert sizes["source_tuned"] == sizes["adapter"] > head


def test_missing_sources_and_unknown_arms_say_what_is_wrong(tmp_path):
    model = build_model("head", TARGET)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"no saved source adapter for \['sentiment'.*train_sources"):
        load_sources(model, tmp_path)
    assert adapter_names(model) == [] and all((before[k] == v).all() for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown arm 'nope'; arms"):
        build_arm("nope", 0)
    with pytest.raises(ValueError, match="needs the best source"):
        build_arm("source_tuned", 0)
    with pytest.raises(SystemExit):
        main(["--sizes", "0", "--out", str(tmp_path)])


def test_the_cli_chooses_on_validation_and_records_every_run(sources, tmp_path):
    directory, _ = sources
    record = main(["--fast", "--sizes", "16", "--seeds", "0", "--arms", "head", "fusion", "--out", str(tmp_path),
                   "--sources", str(directory), "--quiet"])
    assert json.loads((tmp_path / "transfer.json").read_text()) == record
    assert record["best_source"] in SOURCES and set(record["best_source_val"]) == set(SOURCES)
    assert record["fusion_lr"] in FUSION_LRS and len(record["fusion_lr_val"]) == len(FUSION_LRS)
    assert [(r["method"], r["config"]["n"]) for r in record["results"]] == [("head", 16), ("fusion", 16)]
    assert len(record["test_labels"]) == 32 == len(record["results"][1]["test_predictions"])
    study = fusion_against_controls(record)
    assert list(study) == [16] and study[16]["best_control"] == "head" and set(study[16]["vs"]) == {"head"}


def test_the_committed_study_is_complete_and_its_choices_are_the_defaults():
    record = json.loads(RECORD.read_text())
    runs = [(r["method"], r["config"]["n"], r["seed"]) for r in record["results"]]
    assert sorted(runs) == sorted((a, n, s) for a in ARMS for n in (100, 300) for s in (0, 1, 2))
    assert len(record["test_labels"]) == 400 and all(len(r["test_predictions"]) == 400 for r in record["results"])
    assert record["budgets"] == {str(n): asdict(target_budget(n)) for n in (100, 300)}
    assert record["best_source"] == max(record["best_source_val"], key=record["best_source_val"].get)
    assert record["fusion_lr"] == FUSION_LR == RECIPES["fusion"].lr  # the validation choice is the package default
    assert set(record["sources"]) == set(SOURCES) and all((SOURCES_DIR / t / "scores.json").exists() for t in SOURCES)


def test_compare_runs_fusion_on_the_saved_sources_and_refuses_their_own_tasks(tmp_path):
    [r] = compare_main(["--fast", "--methods", "fusion", "--tasks", "vader_nyt", "--out", str(tmp_path), "--quiet"])
    assert r.method == "fusion" and r.trainable_params == fusion_count(384, 6) + 384 * 2 + 2  # fusion + head
    with pytest.raises(SystemExit):  # a source trained on the task itself would make it no transfer at all
        compare_main(["--fast", "--methods", "fusion", "--tasks", "question", "--out", str(tmp_path)])
    assert not (tmp_path / "question").exists()
