"""The `headline` generation task: splits, prompt, ROUGE (real corpus files and tokenizer, no mocks)."""
import pytest

from minipeft.assets import asset_path
from minipeft.lab.generation_tasks import (BODY_TOKENS, TEST_SIZE, VALIDATION_SIZE, headline_prompt, load_headline,
                                       rouge)


@pytest.fixture(scope="module")
def dd():
    return load_headline()


@pytest.fixture(scope="module")
def tok():
    from minipeft.backbones.decoder import load_decoder_tokenizer
    return load_decoder_tokenizer()


def test_split_sizes_disjoint_and_deterministic(dd):
    assert len(dd["validation"]) == VALIDATION_SIZE == 200 and len(dd["test"]) == TEST_SIZE == 300
    assert len(dd["train"]) > 1500
    assert dd.column_names == {s: ["body", "headline"] for s in ("train", "validation", "test")}
    for col in ("body", "headline"):
        sets = [set(dd[s][col]) for s in ("train", "validation", "test")]
        assert sum(map(len, sets)) == sum(len(dd[s]) for s in dd)  # no repeats within or across splits
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert all(text.strip() for s in sets for text in s)
    again = load_headline(max_train=5, max_eval=3, max_test=4)
    assert [len(again[s]) for s in ("train", "validation", "test")] == [5, 3, 4]
    for s in ("train", "validation", "test"):
        assert again[s]["headline"] == dd[s]["headline"][:len(again[s])]


def test_headline_is_first_line(dd):
    row = dd["test"][0]
    files = [f for f in asset_path("bbc_news").glob("*/*.txt")
             if " ".join(f.read_text(encoding="latin-1").partition("\n")[0].split()) == row["headline"]]
    assert len(files) == 1
    first, _, rest = files[0].read_text(encoding="latin-1").partition("\n")
    assert row["body"] == " ".join(rest.split()) and not row["body"].startswith(row["headline"])
    for r in dd["validation"]:
        assert "\n" not in r["headline"] and not r["body"].startswith(r["headline"])


def test_prompt_budget_and_assistant_turn(dd, tok):
    plain = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert plain.endswith("<|im_start|>assistant\n")
    short = headline_prompt(tok, "Short body.")
    overhead = len(short) - len(tok("Short body.", add_special_tokens=False)["input_ids"])
    for body in dd["test"]["body"][:20]:
        ids = headline_prompt(tok, body)
        n_body = len(tok(body, add_special_tokens=False)["input_ids"])
        assert len(ids) == overhead + min(n_body, BODY_TOKENS)
        assert tok.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert len(headline_prompt(tok, body, max_body_tokens=16)) == overhead + min(n_body, 16)
    text = tok.decode(short)
    assert "Short body." in text and "headline" in text
    for ids in (short, headline_prompt(tok, dd["test"][0]["body"], max_body_tokens=10**6)):
        assert ids == tok(tok.decode(ids), add_special_tokens=False)["input_ids"]  # splicing = tokenising the whole


def test_rouge_values():
    assert rouge(["Ink helps drive democracy"], ["Ink helps drive democracy"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge(["apples oranges"], ["stock market falls"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # 5 of 6 unigrams shared, 3 of 5 bigrams, longest common subsequence "the cat on the mat" (5 of 6)
    scores = rouge(["the cat sat on the mat", "x"], ["the cat was on the mat", "x"])
    assert scores == pytest.approx({"rouge1": (5 / 6 + 1) / 2, "rouge2": (0.6 + 0) / 2, "rougeL": (5 / 6 + 1) / 2})
    assert rouge(["Markets rallied"], ["Market rallies"])["rouge1"] == 1.0  # stemming on
    assert rouge([""], ["a headline"])["rougeL"] == 0.0


def test_errors(tok):
    with pytest.raises(ValueError, match="empty"):
        rouge([], [])
    with pytest.raises(ValueError, match="one to one; got 2 predictions and 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="list of strings"):
        rouge("a", "a")
    with pytest.raises(ValueError, match="item 1 is int"):
        rouge(["a", 3], ["a", "b"])
    with pytest.raises(ValueError, match="max_test must be a positive"):
        load_headline(max_test=0)
    with pytest.raises(ValueError, match="body must be a non-empty string"):
        headline_prompt(tok, "  ")
    with pytest.raises(ValueError, match="max_body_tokens must be a positive"):
        headline_prompt(tok, "text", max_body_tokens=0)
