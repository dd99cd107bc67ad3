"""Training the decoder on ``headline``: the loss scores the headline only, a run fills the usual Result, and
``compare --tasks headline`` writes a ROUGE table with a paired test against zero-shot (fast budget: real
SmolLM2 weights and real articles, a handful of them)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minipeft import generate
from minipeft.lab.compare import main as compare_main
from minipeft.lab.generation_report import generation_rows
from minipeft.lab.generation_tasks import headline_prompt, load_headline, rouge, rouge_per_example
from minipeft.lab.generation_train import (GENERATION_LRS, IGNORE, build_lm, decoder_tokenizer, lm_collate, lm_examples,
                                       lm_loss, train_lm, write_headlines)
from minipeft.lab.kinds import render_task
from minipeft.lab.report import load_all
from minipeft.lab.stats import compare_scores
from minipeft.lab.train import Budget, Result
from helpers import TOL

FAST = Budget.generation_fast()


@pytest.fixture(scope="module")
def tok():
    return decoder_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return lm_collate(lm_examples(load_headline(3, 1, 1)["train"], tok, 40), tok.pad_token_id)


def test_examples_score_the_headline_and_the_end_of_turn_only(tok):
    split = load_headline(3, 1, 1)["train"]
    for example, body, headline in zip(lm_examples(split, tok, 40), split["body"], split["headline"]):
        prompt = headline_prompt(tok, body, 40)
        target = tok(headline, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert example["input_ids"] == prompt + target
        assert example["labels"] == [IGNORE] * len(prompt) + target
        assert tok.decode(target) == headline + "<|im_end|>"


def test_collate_pads_on_the_right_and_never_scores_padding(batch):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and len({int(n) for n in mask.sum(1)}) > 1  # lengths differ
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert (labels[row, n:] == IGNORE).all()


def test_loss_is_the_mean_over_headline_tokens_of_the_full_model_loss(batch):
    """lm_loss builds logits only where a headline token is predicted; the reference builds them everywhere and
    lets cross_entropy ignore the rest. Both are means of the same per-token terms (fp32, a few hundred terms)."""
    model = build_lm("zero_shot")
    with torch.no_grad():
        ours = lm_loss(model, batch, "cpu")
        logits = model.logits(model(batch["input_ids"], batch["attention_mask"]))  # (B, T, V)
        reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                    ignore_index=IGNORE)
    assert abs(ours.item() - reference.item()) < TOL
    # the prompt is not scored: changing a prompt token's label (it is IGNORE) cannot change the loss, but
    # scoring one more position would
    widened = {**batch, "labels": batch["labels"].clone()}
    first_scored = int((batch["labels"][0] != IGNORE).nonzero()[0])
    widened["labels"][0, first_scored - 1] = batch["input_ids"][0, first_scored - 1]
    with torch.no_grad():
        assert abs(lm_loss(model, widened, "cpu").item() - ours.item()) > 1e-3


def test_a_lora_run_fills_the_result_and_trains_only_the_adapter(tok):
    model = build_lm("lora", seed=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    r = train_lm(model, "headline", GENERATION_LRS["lora"], FAST, seed=0, method="lora", quiet=True)
    assert isinstance(Result.from_dict(json.loads(json.dumps(r.to_dict()))), Result)
    assert r.metric == "rougeL" and r.task == "headline" and r.budget == FAST.__dict__
    assert r.steps == len(r.losses) == FAST.epochs * math.ceil(FAST.max_train / FAST.batch_size)
    assert len(r.val_acc) == FAST.epochs and len(r.test_predictions) == FAST.max_test
    assert all(isinstance(t, str) for t in r.test_predictions)
    references = list(load_headline(1, 1, FAST.max_test)["test"]["headline"])
    assert r.test_scores == rouge(r.test_predictions, references) and r.test_acc == r.test_scores["rougeL"]
    assert 0 < r.trainable_params == r.stored_params < r.backbone_params
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # the backbone did not move
    # the test headlines are what the trained model writes
    assert write_headlines(model, load_headline(1, 1, 2)["test"]["body"], tok, FAST) == r.test_predictions[:2]


def test_zero_shot_trains_nothing_and_writes_the_greedy_headlines(tok):
    model = build_lm("zero_shot")
    r = train_lm(model, "headline", None, FAST, method="zero_shot", quiet=True)
    assert r.steps == 0 and r.trainable_params == 0 and math.isnan(r.sec_per_step) and len(r.val_acc) == 1
    bodies = load_headline(1, 1, FAST.max_test)["test"]["body"]
    prompts = [headline_prompt(tok, b, FAST.max_length) for b in bodies]
    direct = generate(model, prompts, tok, max_new_tokens=24).texts
    assert r.test_predictions == [t.strip() for t in direct]


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="not compared on generation tasks; allowed"):
        build_lm("houlsby")
    with pytest.raises(ValueError, match="unknown generation task"):
        train_lm(build_lm("zero_shot"), "topic", None, FAST)

def test_compare_refuses_a_method_the_task_cannot_run(capsys):
    with pytest.raises(SystemExit):  # argparse: before any training
        compare_main(["--tasks", "headline", "--methods", "head", "--fast", "--out", "unused"])
    assert "cannot run on the generation task 'headline'; allowed there: ['zero_shot'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_main(["--tasks", "topic", "--methods", "zero_shot", "--fast", "--out", "unused"])
    assert "unknown method(s) ['zero_shot']; registered methods:" in capsys.readouterr().err


def test_each_kind_has_its_budget():
    from minipeft.lab.kinds import kind_of

    assert kind_of("headline").budget(fast=False) == Budget.generation() == Budget.for_generation(fast=False)
    assert kind_of("headline").budget(fast=True) == Budget.generation_fast() == Budget.for_generation(fast=True)
    assert kind_of("topic").budget(fast=False) == Budget.lesson()
    assert kind_of("topic").budget(fast=True) == Budget.fast()


def test_compare_scores_against_a_textbook_t_value():
    """Student's t with 10 degrees of freedom: P(|T| > 2.2281) = 0.05 (any t table)."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=11)
    noise = (noise - noise.mean()) / noise.std(ddof=1)  # mean 0, sd 1
    d = noise + 2.228139 / math.sqrt(11)  # t = mean / (sd / sqrt(n)) = 2.228139
    c = compare_scores(d + 0.5, np.full(11, 0.5))
    assert abs(c.p_t - 0.05) < 1e-4 and abs(c.difference - d.mean()) < 1e-12
    same = compare_scores([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert same.difference == 0 and same.p_t == 1.0 and same.verdict == "within noise"
    with pytest.raises(ValueError, match="same shape"):
        compare_scores([0.1, 0.2], [0.1])


def test_compare_headline_writes_a_rouge_table_paired_with_zero_shot(tmp_path, capsys):
    results = compare_main(["--tasks", "headline", "--methods", "zero_shot", "lora", "--seeds", "0", "1",
                            "--fast", "--quiet", "--out", str(tmp_path)])
    assert [(r.method, r.seed) for r in results] == [("zero_shot", 0), ("lora", 0), ("lora", 1)]
    record = json.loads((tmp_path / "headline" / "comparison.json").read_text())
    assert record["status"] == "complete" and len(record["test_labels"]) == FAST.max_test
    md = (tmp_path / "headline" / "comparison.md").read_text()
    assert "| zero_shot |" in md and "| lora |" in md and (tmp_path / "headline" / "comparison.png").exists()
    rows = {row["method"]: row for row in generation_rows(results, record["test_labels"])}
    per = lambda r: rouge_per_example(r.test_predictions, record["test_labels"])["rougeL"]  # noqa: E731
    expected = np.mean([np.mean(per(r)) for r in results[1:]]) - np.mean(per(results[0]))
    assert abs(rows["lora"]["vs_zero_shot"].difference - expected) < 1e-12
    assert rows["zero_shot"]["vs_zero_shot"] is None
    assert "## headline" in capsys.readouterr().out
    # report: the views are remade from the record; the design table (accuracy) leaves the ROUGE record out
    (tmp_path / "headline" / "comparison.md").unlink()
    assert render_task(tmp_path / "headline" / "comparison.json")["md"].read_text() == md
    assert load_all(tmp_path) == ({}, None)
