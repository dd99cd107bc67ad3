"""The command line's edges: a refused command says what is wrong and names the argument or the file, leaves every
file byte for byte as it was, and trains nothing (``no_training`` turns building a model into an error; the first
test shows that valid commands do reach it, so a refusal that came after training would fail these tests)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from minipeft.lab import compare, report, transfer
from minipeft.lab.cli import main as cli
from minipeft.lab.records import check_output_dir, load_record, read_record, write_atomic, write_json

RESULTS = Path(__file__).resolve().parents[1] / "results"  # committed records: real runs, read without training


class TrainingReached(AssertionError):
    pass


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """Building a model (the first step of every run: compare, train, transfer, generation) raises; cwd is tmp."""
    def refuse(*args, **kwargs):
        raise TrainingReached("a model was built: the command was not refused before training")

    monkeypatch.setattr(compare, "build_model", refuse)  # transfer and train import it from compare when they run
    monkeypatch.setattr("minipeft.lab.generation_train.build_lm", refuse)
    monkeypatch.setattr("minipeft.lab.kinds.classification.build_classifier", refuse)  # compare's runs build here
    monkeypatch.chdir(tmp_path)


def snapshot(root: Path) -> dict:
    """Every file and folder under ``root``: path -> bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def refused(argv, root: Path, capsys) -> str:
    """Run the CLI, expect it to exit with an error and leave ``root`` as it was; return its message."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code not in (0, None)
    assert snapshot(root) == before
    return f"{e.value.code}\n{capsys.readouterr().err}"


def truncated(path: Path) -> bytes:
    """The first 4 KB of a real record: what an interrupted plain write leaves."""
    return path.read_bytes()[:4096]


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write in: chmod 555, or, where that does not stop us (root), /sys."""
    d = tmp_path / "read_only"
    d.mkdir()
    d.chmod(0o555)
    try:
        if os.access(d, os.W_OK):
            d = Path("/sys")
            try:
                check_output_dir(d)
                pytest.skip("no read-only folder here (root, and /sys is writable)")
            except ValueError:
                pass
        yield d
    finally:
        (tmp_path / "read_only").chmod(0o755)


@pytest.mark.parametrize("argv", [["compare", "--fast", "--methods", "head", "--out", "runs"],
                                  ["train", "--fast", "--method", "lora", "--task", "topic", "--out", "runs"],
                                  ["transfer", "--fast", "--sizes", "16", "--out", "runs"]])
def test_a_valid_command_reaches_training(argv, no_training, tmp_path):
    with pytest.raises(TrainingReached):
        cli(argv)
    assert not (tmp_path / "runs").exists()  # the checks create nothing


# ---- compare ---------------------------------------------------------------------------------------------------

def test_compare_refuses_an_output_it_could_not_write_before_training(no_training, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("a file of mine")
    message = refused(["compare", "--fast", "--methods", "head", "--out", "mine.txt"], tmp_path, capsys)
    assert "mine.txt is a file, not a folder; choose another --out" in message
    message = refused(["compare", "--fast", "--methods", "head", "--out", "mine.txt/runs"], tmp_path, capsys)
    assert "mine.txt is a file" in message
    (tmp_path / "runs" / "topic" / "comparison.png").mkdir(parents=True)  # a folder where a result goes
    message = refused(["compare", "--fast", "--methods", "head", "--out", "runs"], tmp_path, capsys)
    assert "runs/topic/comparison.png is in the way" in message


def test_compare_refuses_an_output_in_a_read_only_folder(no_training, tmp_path, read_only_dir, capsys):
    message = refused(["compare", "--fast", "--methods", "head", "--out", str(read_only_dir / "runs")], tmp_path,
                      capsys)
    assert f"cannot write in {read_only_dir}" in message


@pytest.mark.parametrize("content, what", [
    (truncated(RESULTS / "topic" / "comparison.json"), "is not valid JSON"),
    (b"[]", "holds a JSON list, not the object of a record"),
    (b'{"task": "topic"}', "is not a comparison record: it lacks ['budget', 'command', 'status', 'results']"),
    (b'{"task": "topic", "budget": {}, "command": "", "status": "complete", "results": []}', "holds no runs"),
    (b'{"task": "topic", "budget": {}, "command": "", "status": "complete", "results": [{"seed": 0}]}',
     "run 0 of \"results\" is not a run (not a Result record: missing fields"),
])
def test_compare_add_onto_an_unreadable_record_names_it_before_training(content, what, no_training, tmp_path,
                                                                         capsys):
    record = tmp_path / "runs" / "topic" / "comparison.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(content)
    message = refused(["compare", "--fast", "--methods", "head", "--out", "runs", "--add"], tmp_path, capsys)
    assert f"error: runs/topic/comparison.json {what}" in message or f"runs/topic/comparison.json: {what}" in message
    with pytest.raises(ValueError, match="comparison.json"):  # a lesson reading it is told which file, too
        compare.recorded_runs(("head",), "topic", results_dir=tmp_path / "runs")


def test_compare_add_with_another_budget_is_refused_before_training(no_training, tmp_path, capsys):
    shutil.copytree(RESULTS / "topic", tmp_path / "runs" / "topic")  # made with the lesson budget
    message = refused(["compare", "--fast", "--methods", "head", "--out", "runs", "--add"], tmp_path, capsys)
    assert "runs with another budget cannot be added" in message


@pytest.mark.parametrize("argv, says", [
    (["compare", "--seeds", "0", "0"], "argument --seeds: [0] given more than once"),
    (["compare", "--seeds", "0", "--seeds", "1"], "argument --seeds: given twice"),
    (["compare", "--methods", "head", "head"], "argument --methods: ['head'] given more than once"),
    (["compare", "--task", "topic", "--tasks", "question"], "argument --tasks/--task: given twice"),
    (["compare", "--methods"], "argument --methods: expected at least one argument"),
    (["compare", "--methods", "nope"], "unknown method(s) ['nope']; registered methods: ["),
    (["compare", "--tasks", "spam"], "argument --tasks/--task: invalid choice: 'spam'"),
    (["compare", "--tasks", "headline", "--methods", "houlsby"], "cannot run on the generation task 'headline'"),
    (["compare", "--tasks", "topic", "question", "--methods", "head", "fusion"],
     "method 'fusion' cannot run on task 'question': it is built from adapters trained on"),
    (["train", "--method", "fusion", "--task", "question"], "method 'fusion' cannot run on task 'question'"),
    (["train", "--method", "nope"], "unknown method 'nope'; registered methods"),
    (["train", "--method", "lora", "--task", "spam"], "unknown task 'spam' for train, which fits a classifier"),
    (["train", "--method", "lora", "--task", "headline"], "compare trains the generation tasks ['headline']"),
    (["train", "--method", "lora", "--seed", "0", "--seed", "1"], "argument --seed: given twice"),
    (["train", "--method", "lora", "--epochs", "0"], "Budget.epochs must be a positive integer"),
    (["transfer", "--sizes", "16", "16"], "argument --sizes: [16] given more than once"),
    (["transfer", "--arms", "head", "head"], "argument --arms: ['head'] given more than once"),
    (["transfer", "--sizes", "0"], "--sizes must be positive"),
    (["transfer", "--sizes", "100", "100000"], "training examples, got [100, 100000]"),
])
def test_bad_arguments_are_refused_before_training(argv, says, no_training, tmp_path, capsys):
    message = refused(argv + ["--fast", "--out", "runs"], tmp_path, capsys)
    assert says in message


def test_fusion_on_its_sources_own_task_is_refused_by_every_entry(tmp_path):
    """One check of (method, task) pairs: compare and train above, and the builders lessons call."""
    with pytest.raises(ValueError, match="method 'fusion' cannot run on task 'sentiment'"):
        compare.build_model("fusion", "sentiment")
    with pytest.raises(ValueError, match="method 'fusion' cannot run on task 'question'"):
        transfer.build_arm("source_frozen", 0, best="question", task="question")


# ---- train and transfer ------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_train_on_cuda_without_a_gpu_is_refused_before_training(no_training, tmp_path, capsys):
    message = refused(["train", "--method", "lora", "--fast", "--device", "cuda", "--out", "runs"], tmp_path, capsys)
    assert "--device cuda, but no GPU is usable here" in message


def test_train_refuses_an_output_it_could_not_write(no_training, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("a file of mine")
    message = refused(["train", "--method", "lora", "--fast", "--out", "mine.txt"], tmp_path, capsys)
    assert "output folder mine.txt: mine.txt is a file, not a folder" in message
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter").write_text("not the adapter's folder")
    message = refused(["train", "--method", "lora", "--fast", "--out", "run"], tmp_path, capsys)
    assert "run/adapter is a file, not a folder" in message


def test_transfer_refuses_its_folders_and_unreadable_sources_before_stage_one(no_training, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("a file of mine")
    message = refused(["transfer", "--fast", "--out", "mine.txt"], tmp_path, capsys)
    assert "output folder mine.txt: mine.txt is a file" in message
    message = refused(["transfer", "--fast", "--out", "runs", "--sources", "mine.txt"], tmp_path, capsys)
    assert "mine.txt is a file" in message
    scores = tmp_path / "sources" / "vader_tweets" / "scores.json"
    scores.parent.mkdir(parents=True)
    scores.write_text('{"test_acc": 0.8')
    message = refused(["transfer", "--fast", "--out", "runs", "--sources", "sources"], tmp_path, capsys)
    assert "error: sources/vader_tweets/scores.json is not valid JSON" in message


# ---- report ------------------------------------------------------------------------------------------------------

def test_report_leaves_out_a_truncated_record_naming_it_and_reports_the_good_tasks(tmp_path, capsys):
    for task in ("topic", "question"):
        (tmp_path / task).mkdir()
        shutil.copy(RESULTS / task / "comparison.json", tmp_path / task)
    bad = tmp_path / "sentiment" / "comparison.json"
    bad.parent.mkdir()
    bad.write_bytes(truncated(RESULTS / "sentiment" / "comparison.json"))
    (tmp_path / "costs.json").write_text('{"methods": ')
    cli(["report", "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"warning: left out of the report: {bad} is not valid JSON" in err
    assert f"{tmp_path / 'costs.json'} is not valid JSON" in err
    table = (tmp_path / "table.md").read_text()
    assert "topic: acc" in table and "question: acc" in table and "sentiment: acc" not in table
    assert f"Not in the table (unreadable): {bad} is not valid JSON" in table
    assert bad.read_bytes() == truncated(RESULTS / "sentiment" / "comparison.json")
    assert sorted(p.name for p in bad.parent.iterdir()) == ["comparison.json"]  # no views made from it
    assert (tmp_path / "topic" / "comparison.md").exists()


def test_report_of_a_missing_folder_or_of_no_readable_record_says_so(tmp_path, capsys):
    message = refused(["report", "--results", str(tmp_path / "nowhere")], tmp_path, capsys)
    assert f"--results {tmp_path / 'nowhere'}: no such folder" in message
    (tmp_path / "topic").mkdir()
    (tmp_path / "topic" / "comparison.json").write_text("{")
    message = refused(["report", "--results", str(tmp_path)], tmp_path, capsys)
    assert f"{tmp_path / 'topic' / 'comparison.json'} is not valid JSON" in message
    assert "no readable" in message


# ---- writing records: whole or not at all ------------------------------------------------------------------------

def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_a_failed_write_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "record.json", {"runs": 1})
    before = path.read_bytes()
    with monkeypatch.context() as m:  # the disk fills up at the rename
        m.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space left"):
            write_json(path, {"runs": 2})
    assert path.read_bytes() == before and leftovers(tmp_path) == []

    def interrupted(self, data, *args, **kwargs):  # half the bytes written, then Ctrl-C
        with open(self, "w") as f:
            f.write(data[:len(data) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_json(path, {"runs": 3})
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    (tmp_path / "folder.json").mkdir()  # a folder in the way of the rename
    with pytest.raises(OSError):
        write_atomic(tmp_path / "folder.json", "{}")
    assert (tmp_path / "folder.json").is_dir() and leftovers(tmp_path) == []


def test_compare_writes_its_files_whole_and_leaves_no_temporary_file(tmp_path):
    """write_results of real runs (read from a committed record): json, md and png, nothing else; a failure at the
    json leaves no temporary file."""
    runs = compare.load_results(RESULTS / "sentiment" / "comparison.json")
    paths = compare.write_results(runs, tmp_path / "sentiment", "python -m minipeft compare ...")
    assert sorted(p.name for p in (tmp_path / "sentiment").iterdir()) == [
        "comparison.json", "comparison.md", "comparison.png"]
    assert [r["seed"] for r in read_record(paths["json"])["results"]] == [r.seed for r in runs]
    (tmp_path / "blocked" / "comparison.json").mkdir(parents=True)
    with pytest.raises(OSError):
        compare.write_results(runs, tmp_path / "blocked", "python -m minipeft compare ...")
    assert sorted(p.name for p in (tmp_path / "blocked").iterdir()) == ["comparison.json"]
    assert list((tmp_path / "blocked" / "comparison.json").iterdir()) == []


def test_read_record_names_the_file_and_what_is_wrong(tmp_path):
    path = tmp_path / "comparison.json"
    with pytest.raises(ValueError, match=f"{path}: no such file"):
        read_record(path)
    path.write_text(json.dumps({"task": "t"})[:-1])
    with pytest.raises(ValueError, match=f"{path} is not valid JSON .*line 1 column"):
        load_record(path)
